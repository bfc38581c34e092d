//! The built-in chat page: plain HTML, CSS and a JavaScript module, embedded in the binary at
//! compile time and served with their content types, a strict Content-Security-Policy, and
//! ETags so browsers revalidate cheaply instead of caching a stale page across upgrades.

use std::sync::OnceLock;

/// One embedded file.
#[derive(Debug)]
pub(crate) struct Asset {
    /// The file's bytes.
    pub(crate) body: &'static [u8],
    /// Its `Content-Type`.
    pub(crate) content_type: &'static str,
    /// A strong ETag derived from its bytes.
    pub(crate) etag: String,
}

/// The Content-Security-Policy of the page: only its own scripts, styles and WebSocket.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const FILES: [(&str, &[u8], &str); 3] = [
    (
        "/",
        include_bytes!("index.html"),
        "text/html; charset=utf-8",
    ),
    (
        "/app.js",
        include_bytes!("app.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "/style.css",
        include_bytes!("style.css"),
        "text/css; charset=utf-8",
    ),
];

/// The asset served at `path`, if any.
pub(crate) fn asset(path: &str) -> Option<&'static Asset> {
    static ASSETS: OnceLock<Vec<(&'static str, Asset)>> = OnceLock::new();
    let assets = ASSETS.get_or_init(|| {
        FILES
            .iter()
            .map(|&(path, body, content_type)| {
                let etag = format!("\"{:016x}\"", fnv1a(body));
                (
                    path,
                    Asset {
                        body,
                        content_type,
                        etag,
                    },
                )
            })
            .collect()
    });
    let path = if path == "/index.html" { "/" } else { path };
    assets.iter().find(|(p, _)| *p == path).map(|(_, a)| a)
}

/// FNV-1a, 64 bits: a stable fingerprint of a file's bytes for its ETag.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_served_with_its_type_and_a_distinct_etag() {
        let page = asset("/").unwrap();
        assert!(page.content_type.starts_with("text/html"));
        assert!(std::str::from_utf8(page.body).unwrap().contains("app.js"));
        assert_eq!(asset("/index.html").unwrap().etag, page.etag);
        assert!(
            asset("/app.js")
                .unwrap()
                .content_type
                .starts_with("text/javascript")
        );
        assert!(
            asset("/style.css")
                .unwrap()
                .content_type
                .starts_with("text/css")
        );
        assert_ne!(
            asset("/app.js").unwrap().etag,
            asset("/style.css").unwrap().etag
        );
        assert!(asset("/nope.js").is_none());
    }
}
