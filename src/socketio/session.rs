//! One Engine.IO session: its id, its queue of packets, which transport carries it, the
//! heartbeat, and its end. The node's sessions are listed in [`EngineSessions`], by id.
//!
//! A session lives as long as its task, [`run`]: it pings every `ping_interval_secs`, expects
//! the pong within `ping_timeout_secs`, and on any end (timeout, the client's close, a
//! transport failure, shutdown) removes the session from the map and leaves its rooms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Query;
use super::client::{Client, SocketIo};
use crate::chat::Pipeline;
use crate::config::Reloadable;
use crate::conn::writer::Liveness;
use crate::metrics::OpenSession;
use crate::node::{ConnSlot, Node};
use crate::outbox::Outbox;
use crate::protocol::socketio::engine_frame;
use crate::protocol::ws::close_code;

/// How long a session that was told to close (shutdown) waits for its transport to say so.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The Engine.IO sessions of one node, by session id.
#[derive(Default)]
pub struct EngineSessions {
    map: Mutex<HashMap<String, Arc<EngineSession>>>,
}

impl std::fmt::Debug for EngineSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSessions")
            .field("open", &self.len())
            .finish()
    }
}

impl EngineSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<EngineSession>>> {
        // Inserts and removes only: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, sid: &str) -> Option<Arc<EngineSession>> {
        self.lock().get(sid).cloned()
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which Engine.IO transport carries a session's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineTransport {
    Polling,
    /// A WebSocket is probing; polling goes on until the client sends `5`.
    Upgrading,
    /// The probe was answered: the client pauses polling, and sends `5` once its poll ends.
    Probed,
    WebSocket,
}

/// One Engine.IO session.
pub(super) struct EngineSession {
    /// The session id (`sid` in the query).
    pub(super) sid: String,
    /// Packets for the client, each a WebSocket text frame (see the module doc of `socketio`).
    pub(super) outbox: Arc<Outbox>,
    /// The Socket.IO side. Locked while one request's packets are handled, across the
    /// requests' awaits (not across the publishes of `event:message`s, which go on in its
    /// pipeline).
    pub(super) client: tokio::sync::Mutex<Client>,
    /// The client's messages in flight: a reader waits here for room before it reads more.
    pub(super) sends: Pipeline<SocketIo>,
    /// Largest packet, or polling request body, accepted from the client.
    pub(super) max_payload: usize,
    transport: Mutex<EngineTransport>,
    /// Set while a long-poll GET is waiting: a second one is refused.
    polling: AtomicBool,
    pongs: Liveness,
    pong: Notify,
    ended: CancellationToken,
    /// The node's and the client address's connection slots, released when the session ends.
    slot: Mutex<Option<ConnSlot>>,
    /// The table that lists the session, which it leaves when it ends.
    listed_in: Weak<EngineSessions>,
    /// Time the client has to connect to the namespace once the session is open.
    connect_timeout: Duration,
}

/// Opens a session for an admitted handshake, holding `slot` (its connection slots) until
/// it ends; fails only when the OS has no random bytes for its id.
pub(super) fn open(
    node: &Arc<Node>,
    sessions: &Arc<EngineSessions>,
    query: &Query,
    websocket: bool,
    slot: ConnSlot,
) -> Result<Arc<EngineSession>, getrandom::Error> {
    let sid = super::relay::session_id(&random_id()?, &node.id);
    let live = node.live();
    let conn = node.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        live.limits.max_queued_frames,
        live.limits.max_queued_bytes,
    ));
    let client = Client::new(node.clone(), conn, outbox.clone(), query);
    let session = Arc::new(EngineSession {
        sid: sid.clone(),
        outbox,
        sends: client.pipeline(),
        client: tokio::sync::Mutex::new(client),
        max_payload: live.limits.max_frame_bytes,
        transport: Mutex::new(if websocket {
            EngineTransport::WebSocket
        } else {
            EngineTransport::Polling
        }),
        polling: AtomicBool::new(false),
        pongs: Liveness::new(),
        pong: Notify::new(),
        ended: CancellationToken::new(),
        slot: Mutex::new(Some(slot)),
        listed_in: Arc::downgrade(sessions),
        connect_timeout: Duration::from_secs(node.config.socketio.connect_timeout_secs),
    });
    let upgrades: &[&str] = if websocket { &[] } else { &["websocket"] };
    let open = serde_json::json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": live.limits.ping_interval_secs * 1000,
        "pingTimeout": live.limits.ping_timeout_secs * 1000,
        "maxPayload": live.limits.max_frame_bytes,
    });
    // The first packet of the session; the queue is empty, so the push cannot be refused.
    let _ = session
        .outbox
        .push(engine_frame(b'0', open.to_string().as_bytes()));
    sessions.lock().insert(sid, session.clone());
    node.metrics.connections_total.inc();
    node.sessions
        .spawn(run(node.clone(), session.clone(), live));
    Ok(session)
}

/// A session or socket id: 16 bytes (128 bits) from the operating system's CSPRNG, as 22
/// characters of base64url (`A-Z a-z 0-9 - _`, no padding). A session id is the only
/// credential of a polling request, so it must not be guessable from earlier ids.
pub(super) fn random_id() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)?;
    let bits = u128::from_be_bytes(bytes);
    // 22 digits of 6 bits cover 132 bits: the last digit carries the low 2 bits, shifted up.
    Ok((0..22)
        .map(|i| {
            let shift: i32 = 122 - 6 * i;
            let digit = if shift >= 0 {
                bits >> shift
            } else {
                bits << -shift
            };
            ALPHABET[(digit & 63) as usize] as char
        })
        .collect())
}

impl EngineSession {
    fn transport(&self) -> std::sync::MutexGuard<'_, EngineTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the WebSocket transport carries the session now.
    pub(super) fn is_websocket(&self) -> bool {
        *self.transport() == EngineTransport::WebSocket
    }

    /// Starts an upgrade: only a polling session not already probing may.
    pub(super) fn begin_upgrade(&self) -> bool {
        let mut transport = self.transport();
        let polling = *transport == EngineTransport::Polling;
        if polling {
            *transport = EngineTransport::Upgrading;
        }
        polling
    }

    /// The probe was answered (`3probe`).
    pub(super) fn probed(&self) {
        let mut transport = self.transport();
        if *transport == EngineTransport::Upgrading {
            *transport = EngineTransport::Probed;
        }
    }

    /// Whether the client was answered its probe and is about to send `5`.
    pub(super) fn is_probed(&self) -> bool {
        *self.transport() == EngineTransport::Probed
    }

    /// Ends a probe: the WebSocket carries the session from now on (`upgraded`), or polling
    /// goes on.
    pub(super) fn finish_upgrade(&self, upgraded: bool) {
        *self.transport() = if upgraded {
            EngineTransport::WebSocket
        } else {
            EngineTransport::Polling
        };
    }

    /// Marks a long-poll as waiting; `false` if one already is.
    pub(super) fn start_poll(&self) -> bool {
        !self.polling.swap(true, Ordering::AcqRel)
    }

    /// The long-poll ended.
    pub(super) fn end_poll(&self) {
        self.polling.store(false, Ordering::Release);
    }

    /// The client answered a ping.
    pub(super) fn ponged(&self) {
        self.pongs.touch();
        self.pong.notify_one();
    }

    /// Resolves once the session has ended.
    pub(super) async fn ended(&self) {
        self.ended.cancelled().await
    }

    /// Ends the session: no new request finds it, its transport is told to finish, and its
    /// task leaves its rooms.
    pub(super) fn end(&self) {
        if let Some(sessions) = self.listed_in.upgrade() {
            sessions.lock().remove(&self.sid);
        }
        self.outbox.close(close_code::NORMAL, "", true);
        self.ended.cancel();
        // Frees the slots now, not when the last request holding the session is done.
        drop(
            self.slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// The session's task: the connect deadline and the heartbeat, then the cleanup, however
/// the session ends.
async fn run(node: Arc<Node>, session: Arc<EngineSession>, live: Arc<Reloadable>) {
    let _open = OpenSession::new(&node.metrics);
    tokio::select! {
        _ = heartbeats(&node, &session, &live) => {}
        _ = connect_deadline(&session) => {
            // Anything queued (such as a refused CONNECT's reason) goes out first.
            session
                .outbox
                .close(close_code::POLICY_VIOLATION, "connect timeout", true);
        }
    }
    session.end();
    let mut client = session.client.lock().await;
    client.leave_all();
    // Recoverable for `socketio.recovery_secs` from now.
    let ttl = Duration::from_secs(node.config.socketio.recovery_secs);
    client.touch_recovery(ttl).await;
}

/// Resolves when the client has not connected to the namespace `connect_timeout` after the
/// session opened (as socket.io's `connectTimeout`): an Engine.IO session that never
/// authenticates holds no slot for long. Never resolves once it has connected.
async fn connect_deadline(session: &EngineSession) {
    tokio::time::sleep(session.connect_timeout).await;
    // Waits for a CONNECT being handled now, so that it counts.
    if session.client.lock().await.is_connected() {
        std::future::pending::<()>().await;
    }
}

/// Pings every `ping_interval_secs` until the session ends, a pong is late or the node
/// shuts down.
async fn heartbeats(node: &Node, session: &EngineSession, live: &Reloadable) {
    let interval = Duration::from_secs(live.limits.ping_interval_secs);
    let timeout = Duration::from_secs(live.limits.ping_timeout_secs);
    loop {
        tokio::select! {
            _ = session.ended() => return,
            _ = node.shutdown.cancelled() => {
                session.outbox.close(close_code::GOING_AWAY, "server shutting down", true);
                // A WebSocket or a parked poll tells the client at once; a polling client
                // between polls would only find a closed listener: nothing to wait for.
                if session.is_websocket() || session.polling.load(Ordering::Acquire) {
                    let _ = tokio::time::timeout(CLOSE_GRACE, session.ended()).await;
                }
                return;
            }
            _ = tokio::time::sleep(interval) => {
                if !heartbeat(node, session, timeout).await {
                    return;
                }
                let client = session.client.lock().await;
                client.touch_recovery(client.recovery_ttl_open()).await;
            }
        }
    }
}

/// Sends a ping and waits for its pong; `false` when the session ended meanwhile or the
/// pong did not come in time (then the session is closed, its queue dropped).
async fn heartbeat(node: &Node, session: &EngineSession, timeout: Duration) -> bool {
    let sent = Instant::now();
    // Refused only when the session is closing; the loop notices.
    let _ = session.outbox.push(engine_frame(b'2', b""));
    let deadline = sent + timeout;
    loop {
        tokio::select! {
            _ = session.ended() => return false,
            _ = node.shutdown.cancelled() => return true,
            _ = session.pong.notified() => {
                if session.pongs.heard_since(sent) {
                    return true;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if session.pongs.heard_since(sent) {
                    return true;
                }
                session.outbox.close(close_code::PING_TIMEOUT, "ping timeout", false);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::random_id;

    /// The 128 bits an id encodes; its last digit must carry only 2 of its 6 bits.
    fn decode(id: &str) -> u128 {
        const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let digits: Vec<u128> = id
            .chars()
            .map(|c| ALPHABET.find(c).expect("base64url") as u128)
            .collect();
        assert_eq!(digits.len(), 22, "{id}");
        let last = digits[21];
        assert_eq!(last & 15, 0, "{id}");
        digits[..21].iter().fold(0, |v, d| v << 6 | d) << 2 | last >> 4
    }

    #[test]
    fn ids_are_128_random_bits_in_base64url() {
        let mut seen = std::collections::HashSet::new();
        let (mut any, mut all) = (0u128, u128::MAX);
        for _ in 0..10_000 {
            let bits = decode(&random_id().unwrap());
            assert!(seen.insert(bits), "a repeated id");
            any |= bits;
            all &= bits;
        }
        // Every one of the 128 bits varies.
        assert_eq!((any, all), (u128::MAX, 0));
    }
}
