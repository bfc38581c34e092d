//! Who may connect to the node: a new connection (a `/ws` upgrade or a Socket.IO handshake)
//! is counted against its client address and takes one of the node's slots ([`admit`]); its
//! `Origin` is checked against `server.allowed_origins`, and a credential cookie is accepted
//! only from pages that may use it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{ConnSlot, Node, guard};
use crate::metrics::Refusal;

type Body = Full<Bytes>;

/// Why [`admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unadmitted {
    /// The client address is past a per-address limit: 429.
    PerIp(guard::Limited),
    /// The node has `server.max_connections` open: 503.
    Full,
}

impl Unadmitted {
    /// The answer, with the `Retry-After` to wait.
    pub(crate) fn response(self) -> Response<Body> {
        let (status, why, retry) = match self {
            Self::PerIp(guard::Limited::Connections) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address\n",
                "1",
            ),
            Self::PerIp(guard::Limited::Rate) => (
                StatusCode::TOO_MANY_REQUESTS,
                "connecting too fast from your address\n",
                "1",
            ),
            Self::Full => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections\n",
                "5",
            ),
        };
        let mut res = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
        res
    }
}

/// Admits a new connection (a `/ws` upgrade or a Socket.IO handshake): counts the attempt
/// against its client address and takes one of the address's connection slots and one of
/// the node's. The slots are held until the returned guard drops, when the connection ends.
pub(crate) fn admit(
    node: &Arc<Node>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<ConnSlot, Unadmitted> {
    let ip = guard::client_ip(peer.ip(), headers, &node.trusted_proxies);
    let s = &node.config.server;
    let limits = guard::IpLimits {
        max_open: s.max_connections_per_ip,
        rate: s.connects_per_ip_per_second,
        burst: s.connect_burst_per_ip,
    };
    let ip_slot = node.per_ip.admit(ip, limits).map_err(|limited| {
        node.metrics.refused(Refusal::PerIp);
        Unadmitted::PerIp(limited)
    })?;
    node.reserve_slot(ip_slot).ok_or_else(|| {
        node.metrics.refused(Refusal::Capacity);
        Unadmitted::Full
    })
}

/// Whether a WebSocket or Socket.IO request may come from its `Origin`: any when
/// `server.allowed_origins` is empty, else only those listed.
pub(crate) fn origin_allowed(node: &Node, req: &Request<Incoming>) -> bool {
    let live = node.live();
    let allowed = &live.allowed_origins;
    if allowed.is_empty() {
        return true;
    }
    // Browsers always send Origin; a client without one is not a browser page that could be
    // abused cross-site, so it is let through.
    match req.headers().get(header::ORIGIN) {
        None => true,
        Some(origin) => allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()),
    }
}

/// The answer to a request refused by [`cookie_allowed`].
pub(crate) const COOKIE_FORBIDDEN: &str = "origin not allowed: the scalechat_token cookie is accepted only from this site's pages \
     or server.allowed_origins; other pages must send the token themselves\n";

/// With token authentication on: whether the request may authenticate with the
/// `scalechat_token` cookie it carries. A browser attaches the cookie to requests from any
/// page, so a page of another site could otherwise act as the user (cross-site WebSocket
/// hijacking). The cookie is accepted from this site's pages (`Origin` matches `Host`), from
/// `server.allowed_origins`, and from clients that send no `Origin` (not browsers). A token
/// the client sends itself (query parameter, Socket.IO auth payload) is not at risk and is
/// not checked here. True when authentication is off or no cookie is sent.
pub(crate) fn cookie_allowed(node: &Node, headers: &HeaderMap) -> bool {
    node.auth.is_none()
        || guard::token(None, headers).is_none()
        || trusted_origin(node, headers).unwrap_or(true)
}

/// Whether the request's `Origin` is this site (it matches `Host`) or listed in
/// `server.allowed_origins`: the pages that may use the user's credentials. `None` without
/// an `Origin`.
pub(crate) fn trusted_origin(node: &Node, headers: &HeaderMap) -> Option<bool> {
    let origin = headers.get(header::ORIGIN)?;
    let listed = || {
        let live = node.live();
        live.allowed_origins
            .iter()
            .any(|a| a.as_bytes() == origin.as_bytes())
    };
    Some(same_origin(origin, headers.get(header::HOST)) || listed())
}

/// Whether `origin` (`scheme://host[:port]`) names the `host` the request was sent to. A
/// scheme's default port may be written or left out on either side.
fn same_origin(origin: &HeaderValue, host: Option<&HeaderValue>) -> bool {
    let (Ok(origin), Some(Ok(host))) = (origin.to_str(), host.map(HeaderValue::to_str)) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let authority = authority.strip_suffix(default_port).unwrap_or(authority);
    let host = host.strip_suffix(default_port).unwrap_or(host);
    !host.is_empty() && authority.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_compares_the_origin_with_the_host() {
        let same = |origin: &'static str, host: &'static str| {
            same_origin(
                &HeaderValue::from_static(origin),
                Some(&HeaderValue::from_static(host)),
            )
        };
        assert!(same("https://chat.example.com", "chat.example.com"));
        assert!(same("https://Chat.Example.com", "chat.example.com:443"));
        assert!(same("http://127.0.0.1:8000", "127.0.0.1:8000"));
        assert!(same("http://[::1]:80", "[::1]"));
        assert!(!same("https://chat.example.com:8443", "chat.example.com"));
        assert!(!same("https://evil.example.com", "chat.example.com"));
        assert!(!same(
            "https://chat.example.com.evil.net",
            "chat.example.com"
        ));
        assert!(!same("null", "chat.example.com"));
        assert!(!same("chat.example.com", "chat.example.com"));
        assert!(!same("ftp://chat.example.com", "chat.example.com"));
        assert!(!same_origin(
            &HeaderValue::from_static("https://chat.example.com"),
            None
        ));
    }
}
