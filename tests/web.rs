//! The built-in page is served with its content types, a strict CSP and revalidation.

mod common;

use common::{config, http_get, start};

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

#[tokio::test]
async fn page_and_assets_have_types_csp_and_etags() {
    let server = start(config()).await;
    let (status, page) = http_get(server.addr, "/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&page, "content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = header(&page, "content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'self'"));
    assert_eq!(header(&page, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&page, "cache-control"), Some("no-cache"));
    assert!(page.contains("app.js"));

    for (path, kind) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let (status, res) = http_get(server.addr, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            header(&res, "content-type").unwrap().starts_with(kind),
            "{path}"
        );
        let etag = header(&res, "etag").unwrap().to_owned();
        let (status, _) = http_get(server.addr, path, &[("If-None-Match", &etag)]).await;
        assert_eq!(status, 304, "{path} revalidates");
    }
    assert_eq!(http_get(server.addr, "/secret.txt", &[]).await.0, 404);
}
