//! HTTP routing: the built-in page (`/`, `/app.js`, `/style.css`), `/healthz`, `/readyz`,
//! `/metrics`, `/socket.io/` (handed to [`socketio`](crate::socketio)), and `/ws`, which
//! checks the request (method, upgrade headers, Origin, capacity, query) and answers with a
//! clear status before upgrading to a [`native`](crate::native) session.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use crate::api::Api;
use crate::config::MetricsEndpoint;
use crate::metrics::{self, Refusal};
use crate::native::{self, Params};
use crate::node::Node;
use crate::node::access::Grant;
use crate::node::admission::{COOKIE_FORBIDDEN, admit, cookie_allowed, origin_allowed};
use crate::node::guard;
use crate::protocol::native::Since;
use crate::protocol::{DEFAULT_ROOM, RoomName, valid_user_name};
use crate::socketio::{self, EngineSessions};
use crate::web;

type Body = Full<Bytes>;

/// Answers one HTTP request; `socketio` holds the node's Socket.IO sessions, `api` the
/// server API's keys.
pub(crate) async fn route(
    node: Arc<Node>,
    socketio: Arc<EngineSessions>,
    api: Arc<Api>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (_, "/metrics") if node.config.server.metrics_endpoint() != Some(MetricsEndpoint::Main) => {
            text(StatusCode::NOT_FOUND, "not found\n")
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(&node),
        (&Method::GET, "/metrics") => exposition(&node),
        (&Method::GET, "/ws") => websocket(node, peer, req, false),
        (&Method::GET, path)
            if !node.config.server.echo_path.is_empty() && path == node.config.server.echo_path =>
        {
            websocket(node, peer, req, true)
        }
        (_, "/socket.io/" | "/socket.io") => socketio::route(node, &socketio, peer, req).await,
        (_, path) if path.starts_with("/api/") => api.route(node, req).await,
        (&Method::GET | &Method::HEAD, path) if web::asset(path).is_some() => page(&req, path),
        (_, "/healthz" | "/readyz" | "/metrics" | "/ws") => get_only(),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// Answers one HTTP request on the listener of `server.metrics_listen`: `/metrics` alone.
pub(crate) async fn route_metrics(
    node: Arc<Node>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => exposition(&node),
        (_, "/metrics") => get_only(),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn get_only() -> Response<Body> {
    let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    res
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn owned_text(status: StatusCode, body: String) -> Response<Body> {
    let mut res = text(status, "");
    *res.body_mut() = Full::new(Bytes::from(body));
    res
}

/// A file of the built-in page, or 304 when the browser's copy is current.
fn page(req: &Request<Incoming>, path: &str) -> Response<Body> {
    let Some(asset) = web::asset(path) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|tag| tag.as_bytes() == asset.etag.as_bytes());
    let mut res = if fresh {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        res
    } else if req.method() == Method::HEAD {
        Response::new(Full::new(Bytes::new()))
    } else {
        Response::new(Full::new(Bytes::from_static(asset.body)))
    };
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(etag) = HeaderValue::from_str(&asset.etag) {
        headers.insert(header::ETAG, etag);
    }
    // Revalidate every time: a 304 is cheap, and an upgraded server never serves stale code.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn readiness(node: &Node) -> Response<Body> {
    if node.shutdown.is_cancelled() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
    } else if !node.transport.is_ready() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: transport down\n",
        )
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

/// `/metrics`: every counter in Prometheus text format.
fn exposition(node: &Node) -> Response<Body> {
    let mut res = owned_text(StatusCode::OK, node.metrics.render());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    res
}

/// Checks and upgrades a WebSocket request: chat on `/ws`, or the echo endpoint (`echo`).
fn websocket(
    node: Arc<Node>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    echo: bool,
) -> Response<Body> {
    let refuse = |why| node.metrics.refused(why);
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        refuse(Refusal::BadRequest);
        let mut res = text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request\n",
        );
        res.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        return res;
    }
    if !origin_allowed(&node, &req) {
        refuse(Refusal::Origin);
        return text(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    if node.shutdown.is_cancelled() {
        refuse(Refusal::ShuttingDown);
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let query = req.uri().query().unwrap_or("");
    let mut params = match params(query) {
        Ok(params) => params,
        Err(why) => {
            refuse(Refusal::BadRequest);
            return owned_text(StatusCode::BAD_REQUEST, why);
        }
    };
    if let Some(auth) = &node.auth {
        let query_token = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        if query_token.is_none() && !cookie_allowed(&node, req.headers()) {
            refuse(Refusal::Origin);
            return text(StatusCode::FORBIDDEN, COOKIE_FORBIDDEN);
        }
        let user = guard::token(query_token.as_deref(), req.headers())
            .ok_or_else(|| {
                "a token is required: the token query parameter or the scalechat_token cookie"
                    .to_owned()
            })
            .and_then(|token| auth.user(token));
        match user {
            // The token names the user; a `name` in the query cannot override it.
            Ok(identity) => {
                params.name = identity.name;
                params.grant = identity.grant;
            }
            Err(why) => {
                refuse(Refusal::Unauthorized);
                return owned_text(StatusCode::UNAUTHORIZED, format!("{why}\n"));
            }
        }
    }
    params.echo = echo;
    let slot = match admit(&node, peer, req.headers()) {
        Ok(slot) => slot,
        Err(refused) => return refused.response(),
    };
    // hyper's upgrade is taken first, so fastwebsockets only checks the request and builds the
    // 101 response: awaiting its upgrade future would build a `WebSocket` (with an 8 KiB read
    // buffer) only for the session to take the raw stream back out of it.
    let upgrade = hyper::upgrade::on(&mut req);
    let response = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, _)) => response,
        Err(e) => {
            refuse(Refusal::BadRequest);
            return owned_text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    node.metrics.connections_total.inc();
    debug!(%peer, room = %params.room, "websocket upgrade");
    node.sessions
        .spawn(native::run(node.clone(), upgrade, params, slot));
    response.map(|_| Full::new(Bytes::new()))
}

/// Reads `room`, `name`, `since`, `epoch` and `presence` from the `/ws` query; unknown
/// parameters are ignored.
fn params(query: &str) -> Result<Params, String> {
    let mut room = None;
    let mut name = None;
    let mut since = None;
    let mut epoch = None;
    let mut presence = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "room" => {
                room = Some(RoomName::new(&value).map_err(|e| format!("room: {}\n", e.message))?)
            }
            "name" if valid_user_name(&value) => name = Some(value.into_owned()),
            "name" => {
                return Err(
                    "name: display names are 1 to 32 characters, not blank, no control or invisible format characters\n"
                        .into(),
                );
            }
            "since" => {
                since = Some(value.parse::<u64>().map_err(|_| {
                    "since: the id of the last message seen, a whole number\n".to_owned()
                })?)
            }
            "epoch" => epoch = Some(value.into_owned()),
            "presence" => {
                presence = match &*value {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err("presence: 1 or true to get presence events\n".into()),
                }
            }
            _ => {}
        }
    }
    let since = since
        .map(|id| Since::new(id, epoch.as_deref()))
        .transpose()
        .map_err(|e| format!("since: {}\n", e.message))?;
    Ok(Params {
        room: room.unwrap_or_else(|| {
            // The default room name is a valid constant.
            RoomName::new(DEFAULT_ROOM).expect("valid default room")
        }),
        name: name.unwrap_or_else(|| format!("guest-{:04x}", fastrand::u16(..))),
        since,
        presence,
        grant: Grant::default(),
        echo: false,
    })
}

#[cfg(test)]
mod tests {
    use super::params;

    #[test]
    fn query_defaults_and_decoding() {
        let p = params("").unwrap();
        assert_eq!(p.room.as_str(), "general");
        assert!(p.name.starts_with("guest-"));
        let p = params("room=dev&name=Ana%20Mar%C3%ADa&since=4&epoch=ab12").unwrap();
        assert_eq!(p.room.as_str(), "dev");
        assert_eq!(p.name, "Ana María");
        assert_eq!(
            p.since.as_ref().map(|s| (s.id, s.epoch.as_str())),
            Some((4, "ab12"))
        );
        assert!(params("since=4").is_err(), "since needs its epoch");
        assert!(params("since=x&epoch=ab").is_err());
        assert!(params("since=1&epoch=a%22b").is_err());
    }

    #[test]
    fn query_rejects_bad_room_and_name() {
        assert!(params("room=a%20b").unwrap_err().starts_with("room:"));
        assert!(params("name=%20%20").unwrap_err().starts_with("name:"));
        assert!(params(&format!("name={}", "x".repeat(33))).is_err());
        // Control characters, and invisible format characters: bidi overrides and
        // isolates, zero-width spaces and joiners, the byte order mark, soft hyphens.
        for bad in [
            "a%00b",
            "a%0Ab",
            "a%C2%85b",
            "%E2%80%AEnimda",
            "ad%E2%80%8Bmin",
            "%E2%81%A6x",
            "%EF%BB%BFann",
            "an%C2%ADn",
            "a%D8%9Cb",
            "a%E1%A0%8Eb",
            "a%E2%80%A8b",
            "a%F3%A0%80%81b",
        ] {
            let refused = params(&format!("name={bad}")).unwrap_err();
            assert!(refused.starts_with("name:"), "{bad}: {refused}");
        }
        // Letters of any script still pass, combining marks and emoji included.
        for good in ["%D8%B9%D9%84%D9%8A", "Zo%C3%AB", "e%CC%81", "%F0%9F%98%80"] {
            assert!(params(&format!("name={good}")).is_ok(), "{good}");
        }
    }
}
