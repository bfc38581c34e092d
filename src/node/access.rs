//! Who may join which room, and who may only read it. With authentication off every room is
//! open. With it on, a join of room R by user U is decided, in this order:
//!
//! 1. A direct-message room (see [`RoomName::direct`]) admits only its two users.
//! 2. R matches `auth.public_rooms`: open to every user.
//! 3. U's token lists rooms (`rooms`, `read_only_rooms` claims): R must match one of them.
//! 4. `auth.join_hook_url` is set: the application's backend is asked, with a timeout, a
//!    bounded cache of its answers and a cap on requests in flight; no clear "yes" is a no.
//! 5. Otherwise (a token that lists no rooms, no hook): open, as before rooms were granted.
//!
//! A pattern is a room name, or a prefix followed by `*` (`team-42-*`); `*` alone is every
//! room but direct-message ones.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::warn;

use crate::config::AuthConfig;
use crate::protocol::{ErrorCode, ProtocolError, RoomName, RoomPattern};

/// Answers kept from the join hook, at most.
const HOOK_CACHE_MAX: usize = 10_000;
/// Hook requests in flight at once, at most; more joins wait for a free one.
const HOOK_IN_FLIGHT: usize = 16;
/// The largest hook answer read.
const HOOK_ANSWER_MAX: usize = 4096;

/// What a user may do in a room they joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read and send.
    ReadWrite,
    /// Read only: `send` is refused with `read_only`.
    ReadOnly,
}

/// The rooms a token grants: `None` when it lists none, as most connections' tokens do (or
/// they have none). Boxed: every connection holds a grant for its whole life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant(Option<Box<Listed>>);

/// The rooms a token lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    rooms: Vec<RoomPattern>,
    read_only: Vec<RoomPattern>,
}

impl Grant {
    /// The grant of a token's `rooms` and `read_only_rooms` claims; why not, for a pattern
    /// that is not one.
    pub fn from_claims(
        rooms: Option<&[String]>,
        read_only: Option<&[String]>,
    ) -> Result<Self, String> {
        let parse = |list: &[String], claim: &str| {
            list.iter()
                .map(|p| {
                    RoomPattern::parse(p).ok_or_else(|| {
                        format!("invalid token: `{claim}` holds {p:?}, not a room pattern")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if rooms.is_none() && read_only.is_none() {
            return Ok(Self(None));
        }
        Ok(Self(Some(Box::new(Listed {
            rooms: parse(rooms.unwrap_or_default(), "rooms")?,
            read_only: parse(read_only.unwrap_or_default(), "read_only_rooms")?,
        }))))
    }

    /// What the token says of `room`: `None` when it lists no rooms.
    fn decide(&self, room: &RoomName) -> Option<Option<Mode>> {
        let listed = self.0.as_deref()?;
        Some(if listed.rooms.iter().any(|p| p.matches(room)) {
            Some(Mode::ReadWrite)
        } else if listed.read_only.iter().any(|p| p.matches(room)) {
            Some(Mode::ReadOnly)
        } else {
            None
        })
    }
}

/// The hook's answer.
#[derive(Debug, Deserialize)]
struct HookAnswer {
    allow: bool,
    #[serde(default)]
    read_only: bool,
}

/// An answer of the join hook and until when it holds; `None`: not allowed.
type CachedAnswer = (Instant, Option<Mode>);

/// The join hook: its client, its cache, its cap.
struct Hook {
    url: hyper::Uri,
    timeout: Duration,
    cache_for: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    cache: Mutex<HashMap<(String, RoomName), CachedAnswer>>,
    in_flight: Semaphore,
}

/// The node's room access rules.
pub struct Access {
    /// Authentication is on: rooms are decided. Off: every room is open.
    enforced: bool,
    public: Vec<RoomPattern>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("enforced", &self.enforced)
            .field("public", &self.public)
            .field("hook", &self.hook.as_ref().map(|h| h.url.to_string()))
            .finish()
    }
}

impl Access {
    /// The rules of `[auth]` (validated: patterns and the hook URL parse).
    pub fn new(config: &AuthConfig) -> Self {
        let hook = config
            .join_hook_url
            .parse::<hyper::Uri>()
            .ok()
            .filter(|_| !config.join_hook_url.is_empty());
        Self {
            enforced: !config.jwt_secret.expose().is_empty(),
            public: config
                .public_rooms
                .iter()
                .filter_map(|p| RoomPattern::parse(p))
                .collect(),
            hook: hook.map(|url| Hook {
                url,
                timeout: Duration::from_millis(config.join_hook_timeout_ms),
                cache_for: Duration::from_secs(config.join_hook_cache_secs),
                client: Client::builder(TokioExecutor::new()).build_http(),
                cache: Mutex::default(),
                in_flight: Semaphore::new(HOOK_IN_FLIGHT),
            }),
        }
    }

    /// Whether `user`, with `grant`, may join `room`, and how.
    pub async fn decide(
        &self,
        user: &str,
        grant: &Grant,
        room: &RoomName,
    ) -> Result<Mode, ProtocolError> {
        let forbidden = |why: &str| {
            Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("you may not join room {room}: {why}"),
            ))
        };
        if room.is_direct() {
            return forbidden("join a direct-message room with `dm` and the other user's name");
        }
        if !self.enforced || self.public.iter().any(|p| p.matches(room)) {
            return Ok(Mode::ReadWrite);
        }
        match grant.decide(room) {
            Some(Some(mode)) => return Ok(mode),
            Some(None) => return forbidden("your token does not list it"),
            None => {}
        }
        let Some(hook) = &self.hook else {
            return Ok(Mode::ReadWrite);
        };
        match hook.ask(user, room).await {
            Some(mode) => Ok(mode),
            None => forbidden("the application did not allow it"),
        }
    }
}

impl Hook {
    /// The backend's answer for `user` in `room`, cached; `None`: not allowed (a no, or no
    /// clear answer in time).
    async fn ask(&self, user: &str, room: &RoomName) -> Option<Mode> {
        let key = (user.to_owned(), room.clone());
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let Ok(_permit) = self.in_flight.acquire().await else {
            return None;
        };
        // Another join may have asked the same while this one waited.
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let answer = match tokio::time::timeout(self.timeout, self.request(user, room)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(why)) => {
                warn!(%room, error = %why, "the join hook gave no answer: joins it decides are refused");
                return None; // not cached: the next join asks again
            }
            Err(_) => {
                warn!(%room, timeout_ms = self.timeout.as_millis() as u64,
                    "the join hook did not answer in time: joins it decides are refused");
                return None;
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= HOOK_CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= HOOK_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now() + self.cache_for, answer));
        answer
    }

    fn cached(&self, key: &(String, RoomName)) -> Option<Option<Mode>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, answer)| *answer)
    }

    /// POSTs `{"user","room"}`; a 200 answer `{"allow": true}` (and `"read_only"`) allows.
    async fn request(&self, user: &str, room: &RoomName) -> Result<Option<Mode>, String> {
        let body = serde_json::json!({ "user": user, "room": room }).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), HOOK_ANSWER_MAX)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != StatusCode::OK {
            return Ok(None);
        }
        let answer: HookAnswer = serde_json::from_slice(&body)
            .map_err(|e| format!("answer is not {{\"allow\": …}}: {e}"))?;
        Ok(answer.allow.then_some(if answer.read_only {
            Mode::ReadOnly
        } else {
            Mode::ReadWrite
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[test]
    fn patterns_match_names_and_prefixes_never_direct_rooms() {
        let team = RoomPattern::parse("team-42-*").unwrap();
        assert!(team.matches(&room("team-42-ops")));
        assert!(!team.matches(&room("team-4")));
        let exact = RoomPattern::parse("general").unwrap();
        assert!(exact.matches(&room("general")) && !exact.matches(&room("general2")));
        let all = RoomPattern::parse("*").unwrap();
        assert!(all.matches(&room("x")));
        assert!(!all.matches(&RoomName::direct("ann", "bob")));
        assert!(RoomPattern::parse("a b").is_none());
        assert!(RoomPattern::parse("").is_none());
    }

    #[test]
    fn a_grant_lists_rooms_and_read_only_rooms() {
        let list = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let grant = Grant::from_claims(Some(&list(&["team-*"])), Some(&list(&["news"]))).unwrap();
        assert_eq!(grant.decide(&room("team-a")), Some(Some(Mode::ReadWrite)));
        assert_eq!(grant.decide(&room("news")), Some(Some(Mode::ReadOnly)));
        assert_eq!(grant.decide(&room("other")), Some(None));
        assert_eq!(Grant::default().decide(&room("other")), None);
        assert!(Grant::from_claims(Some(&list(&["bad room"])), None).is_err());
    }
}
