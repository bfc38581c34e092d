//! The server API at `/api/v1/` for the application's backend (docs/api.md): JSON in and
//! out, each request authenticated by an API key (`Authorization: Bearer …`, compared in
//! constant time) and rate-limited per key, bodies bounded. It posts messages through the
//! same delivery path as a client's `send` (ids, history, `ref` dedupe, acks), reads a
//! room's history and members, lists rooms, and disconnects a user on every node.
//!
//! Off (every path 404) while no key is configured.

mod rooms;

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat::rate::TokenBucket;
use crate::config::ApiConfig;
use crate::node::Node;
use crate::protocol::{ErrorCode, ProtocolError};

type Body = Full<Bytes>;

/// The OpenAPI description, served at `/api/v1/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// The API's keys and their rate limits.
pub(crate) struct Api {
    keys: Vec<Vec<u8>>,
    /// One bucket per key, in the order of `keys`.
    buckets: Mutex<Vec<TokenBucket>>,
    /// The rate and burst of each key's bucket.
    requests_per_second: f64,
    request_burst: u32,
    max_body_bytes: usize,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// An API error: the HTTP status and the protocol's code.
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn response(&self) -> Response<Body> {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        json_response(self.status, &body)
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        let status = match e.code {
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Forbidden | ErrorCode::ReadOnly => StatusCode::FORBIDDEN,
            ErrorCode::NotJoined => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.code.as_str(), e.message)
    }
}

impl Api {
    /// The API of `config` (its keys read, `keys_file` included; validated before).
    pub(crate) fn new(config: &ApiConfig) -> Self {
        let keys: Vec<Vec<u8>> = config
            .all_keys()
            .unwrap_or_default()
            .iter()
            .map(|k| k.expose().as_bytes().to_vec())
            .collect();
        let buckets = keys
            .iter()
            .map(|_| TokenBucket::new(config.request_burst))
            .collect();
        Self {
            keys,
            buckets: Mutex::new(buckets),
            requests_per_second: config.requests_per_second,
            request_burst: config.request_burst,
            max_body_bytes: config.max_body_bytes,
        }
    }

    /// Answers one request under `/api/`.
    pub(crate) async fn route(&self, node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if self.keys.is_empty() {
            return ApiError::new(StatusCode::NOT_FOUND, "not_found", "the API is off").response();
        }
        if req.method() == Method::GET && req.uri().path() == "/api/v1/openapi.json" {
            let mut res = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return res;
        }
        let answer = match self.authorize(&req) {
            Ok(()) => self.handle(node, req).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(body) => json_response(StatusCode::OK, &body),
            Err(e) => e.response(),
        }
    }

    /// Checks the key (in constant time against each) and takes a token of its bucket.
    fn authorize(&self, req: &Request<Incoming>) -> Result<(), ApiError> {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
            )
        };
        let given = given.ok_or_else(unauthorized)?;
        // Every key is compared, so the time taken does not tell which (or how much) matched.
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if constant_time_eq(key, given) {
                found = Some(i);
            }
        }
        let index = found.ok_or_else(unauthorized)?;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets[index].take(Instant::now(), self.requests_per_second, self.request_burst) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this key sends requests faster than api.requests_per_second allows",
            ))
        }
    }

    async fn handle(&self, node: Arc<Node>, req: Request<Incoming>) -> Result<Value, ApiError> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let segments: Vec<String> = path
            .trim_start_matches("/api/v1/")
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();
        let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
        if !path.starts_with("/api/v1/") {
            return Err(not_found());
        }
        match (&method, segments.as_slice()) {
            (&Method::GET, ["rooms"]) => rooms::list(&node, &query).await,
            (&Method::POST, ["rooms", room, "messages"]) => {
                let body = self.body(req).await?;
                rooms::post(&node, room, &body).await
            }
            (&Method::GET, ["rooms", room, "messages"]) => {
                rooms::history(&node, room, &query).await
            }
            (&Method::GET, ["rooms", room, "presence"]) => {
                rooms::presence(&node, room, &query).await
            }
            (&Method::POST, ["users", user, "disconnect"]) => rooms::disconnect(&node, user).await,
            (_, ["rooms"] | ["rooms", _, "messages" | "presence"] | ["users", _, "disconnect"]) => {
                Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "see /api/v1/openapi.json for the methods of each endpoint",
                ))
            }
            _ => Err(not_found()),
        }
    }

    /// The request body as JSON, at most `api.max_body_bytes`.
    async fn body(&self, req: Request<Incoming>) -> Result<Value, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than {} bytes", self.max_body_bytes),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return Err(too_large());
        }
        let bytes = Limited::new(req.into_body(), self.max_body_bytes)
            .collect()
            .await
            .map_err(|_| too_large())?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadJson.as_str(),
                format!("not valid JSON: {e}"),
            )
        })
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abc", b"abcdef"));
    }
}
