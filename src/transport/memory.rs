//! The embedded transport: one node, no external service. Each room has a log: its last id,
//! its epoch, its history and its recent `ref`s. The log's lock is held while an id is
//! assigned, the message stored and handed to the hub, so every member sees messages in id
//! order and a history snapshot never disagrees with live delivery.
//!
//! With the archive on, each accepted message is offered to it (never waiting), the room logs
//! serve as its hot store to catch up from, and a room continues the epoch and ids the archive
//! last holds for it, after a restart and after the room was swept from memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::archive::Archive;
use crate::archive::catchup::HotStore;
use crate::config::RoomsConfig;
use crate::hub::Hub;
use crate::protocol::RoomName;
use crate::protocol::message::Message;
use crate::protocol::native::Since;
use crate::protocol::presence;
use crate::protocol::ws::close_code;
use crate::transport::local_presence;
use crate::transport::{Archived, Envelope, Page, Published, Snapshot, new_epoch};
use crate::webhooks::{Event, EventKind, Webhooks};

/// In-process transport.
#[derive(Debug)]
pub struct MemoryTransport {
    hub: Arc<Hub>,
    policy: RoomsConfig,
    // Outer lock only to find the room's log; the per-room lock orders id assignment,
    // storage and delivery, so rooms do not wait on each other.
    rooms: Arc<RoomLogs>,
    /// Room lookups so far; every [`SWEEP_EVERY`]th one sweeps idle rooms.
    lookups: AtomicU64,
    /// Socket.IO sessions' recovery state by `pid`, until it expires.
    recoveries: Mutex<HashMap<String, (Instant, String)>>,
    /// Where messages and presence changes are reported, when anyone asked.
    webhooks: Option<Arc<Webhooks>>,
    /// The archive, when on.
    archive: Option<Arc<Archive>>,
    /// With the archive: the epoch and last id of rooms not in `rooms` (archived before a
    /// restart, or swept since), which they continue from when used again.
    resume: Mutex<HashMap<RoomName, (Arc<str>, u64)>>,
}

/// The room logs, shared with the archive as its hot store.
#[derive(Debug, Default)]
struct RoomLogs(Mutex<HashMap<RoomName, Arc<Mutex<RoomLog>>>>);

impl RoomLogs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Arc<Mutex<RoomLog>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HotStore for RoomLogs {
    fn since(&self, room: &RoomName, epoch: &str, from: u64) -> Vec<Arc<Message>> {
        let Some(log) = self.lock().get(room).cloned() else {
            return Vec::new();
        };
        let log = log.lock().unwrap_or_else(PoisonError::into_inner);
        if *log.epoch != *epoch {
            return Vec::new();
        }
        log.history
            .iter()
            .filter(|m| m.id() >= from)
            .map(|m| m.message.clone())
            .collect()
    }
}

/// Recovery states kept at most (sessions open and recently ended).
const MAX_RECOVERIES: usize = 200_000;

/// How often (in room lookups) idle rooms are swept.
const SWEEP_EVERY: u64 = 4096;

#[derive(Debug)]
struct RoomLog {
    epoch: Arc<str>,
    last_id: u64,
    /// Oldest first.
    history: VecDeque<Stored>,
    /// `ref` key -> id, for the dedupe window; `ref_order` expires them oldest first.
    refs: HashMap<String, u64>,
    ref_order: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
struct Stored {
    at: Instant,
    /// The message as delivered live: replayed to joining clients without a copy.
    message: Arc<Message>,
}

impl Stored {
    fn id(&self) -> u64 {
        self.message.id()
    }
}

impl RoomLog {
    /// A room's log, in a new epoch, or continuing `(epoch, last_id)`.
    fn new(resume: Option<(Arc<str>, u64)>) -> Self {
        let (epoch, last_id) = resume.unwrap_or_else(|| (new_epoch().into(), 0));
        Self {
            epoch,
            last_id,
            history: VecDeque::new(),
            refs: HashMap::new(),
            ref_order: VecDeque::new(),
        }
    }

    /// Drops history older than the TTL and `ref`s older than the dedupe window.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .history
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.at) >= ttl)
        {
            self.history.pop_front();
        }
        while self
            .ref_order
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            if let Some((_, key)) = self.ref_order.pop_front() {
                self.refs.remove(&key);
            }
        }
    }
}

impl MemoryTransport {
    /// A transport delivering into `hub`, keeping history as `policy` says.
    pub fn new(hub: Arc<Hub>, policy: RoomsConfig) -> Self {
        Self {
            hub,
            policy,
            rooms: Arc::default(),
            lookups: AtomicU64::new(0),
            recoveries: Mutex::new(HashMap::new()),
            webhooks: None,
            archive: None,
            resume: Mutex::default(),
        }
    }

    /// The same transport, reporting its events to `webhooks`.
    pub fn with_webhooks(mut self, webhooks: Arc<Webhooks>) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// The webhooks, when they want events of `kind`.
    fn webhooks(&self, kind: EventKind) -> Option<&Webhooks> {
        self.webhooks.as_deref().filter(|w| w.wants(kind))
    }

    /// The transport, archiving every accepted message in `archived`, its rooms continuing
    /// where the archive left them.
    pub fn with_archive(hub: Arc<Hub>, policy: RoomsConfig, archived: Archived) -> Self {
        let mut transport = Self::new(hub, policy);
        archived.archive.set_hot_store(transport.rooms.clone());
        transport.archive = Some(archived.archive);
        transport.resume = Mutex::new(
            archived
                .positions
                .into_iter()
                .map(|(room, p)| (room, (Arc::from(p.epoch), p.last_id)))
                .collect(),
        );
        transport
    }

    fn log(&self, room: &RoomName) -> Arc<Mutex<RoomLog>> {
        let mut rooms = self.rooms.lock();
        if self.lookups.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(&mut rooms);
        }
        match rooms.get(room) {
            Some(log) => log.clone(),
            None => {
                let resume = self
                    .resume
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(room);
                rooms
                    .entry(room.clone())
                    .or_insert_with(|| Arc::new(Mutex::new(RoomLog::new(resume))))
                    .clone()
            }
        }
    }

    /// Forgets rooms with no member, no history left and no `ref` to remember, so that rooms
    /// used once do not stay in memory. Such a room starts again in a new epoch; with the
    /// archive, it continues its epoch and ids (kept in `resume`, a few dozen bytes a room).
    fn sweep(&self, rooms: &mut HashMap<RoomName, Arc<Mutex<RoomLog>>>) {
        let now = Instant::now();
        let ttl = self.ttl();
        let mut resume = self.resume.lock().unwrap_or_else(PoisonError::into_inner);
        rooms.retain(|name, log| {
            // A log in use is not idle; it is looked at again next time.
            let Ok(mut log) = log.try_lock() else {
                return true;
            };
            log.expire(now, ttl);
            // Whoever could be about to use the log (a sender, a joiner, a pager) is a member.
            let idle = log.history.is_empty()
                && log.refs.is_empty()
                && self.hub.members(name.as_str()) == 0;
            if idle && self.archive.is_some() && log.last_id > 0 {
                resume.insert(name.clone(), (log.epoch.clone(), log.last_id));
            }
            !idle
        });
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.policy.history_ttl_secs)
    }

    /// Assigns the next id, stores and delivers; or, for a `ref` seen within the dedupe
    /// window, returns the id it got then and delivers nothing.
    pub fn publish(&self, envelope: Envelope) -> Published {
        let log = self.log(&envelope.draft.room);
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        log.expire(now, self.ttl());
        let window = Duration::from_secs(self.policy.dedupe_window_secs);
        let dedupe = envelope.dedupe.as_ref().filter(|_| !window.is_zero());
        if let Some(id) = dedupe.and_then(|key| log.refs.get(key)) {
            return Published {
                id: *id,
                duplicate: true,
            };
        }
        log.last_id += 1;
        let id = log.last_id;
        if let Some(key) = dedupe {
            log.refs.insert(key.clone(), id);
            log.ref_order.push_back((now + window, key.clone()));
        }
        let message = Arc::new(envelope.draft.accept(id, log.epoch.clone()));
        if self.policy.history_size > 0 {
            if log.history.len() >= self.policy.history_size {
                log.history.pop_front();
            }
            log.history.push_back(Stored {
                at: now,
                message: message.clone(),
            });
        }
        self.hub.deliver(&message);
        if let Some(webhooks) = self.webhooks(EventKind::Message) {
            webhooks.emit(Event::message(
                message.room().as_str(),
                id,
                message.epoch(),
                message.user(),
                message.ts(),
                message.text(),
            ));
        }
        if let Some(archive) = &self.archive {
            // Never waits: a full queue counts it, and the archive catches up from this log.
            archive.offer(&message);
        }
        Published {
            id,
            duplicate: false,
        }
    }

    /// What a client joining `room` gets: the messages after `since` that are still here
    /// (recovered if none is missing), else the newest `history_on_join`.
    pub fn snapshot(&self, room: &RoomName, since: Option<&Since>) -> Snapshot {
        let log = self.log(room);
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        log.expire(Instant::now(), self.ttl());
        let reachable = |s: &Since| {
            *s.epoch == *log.epoch
                && s.id <= log.last_id
                && (s.id == log.last_id || log.history.front().is_some_and(|m| m.id() <= s.id + 1))
        };
        let recovered = since.map(reachable);
        let messages = match since {
            // Same epoch: whatever is still stored after `since`, all of it when recovered.
            Some(s) if *s.epoch == *log.epoch && s.id < log.last_id => log
                .history
                .iter()
                .filter(|m| m.id() > s.id)
                .map(|m| m.message.clone())
                .collect(),
            Some(_) if recovered == Some(true) => Vec::new(),
            _ => {
                let skip = log
                    .history
                    .len()
                    .saturating_sub(self.policy.history_on_join);
                log.history
                    .iter()
                    .skip(skip)
                    .map(|m| m.message.clone())
                    .collect()
            }
        };
        Snapshot {
            epoch: log.epoch.to_string(),
            last_id: log.last_id,
            messages,
            recovered,
        }
    }

    /// Tells `room`'s members that `user`'s presence changed (this node is every node);
    /// returns the users in the room.
    pub fn presence_changed(&self, room: &RoomName, user: &Arc<str>) -> usize {
        let online = local_presence::changed(&self.hub, room, user);
        let joined = self.hub.local_user(room.as_str(), user).is_some();
        let (member, occupancy) = if joined {
            (
                EventKind::MemberJoined,
                (online == 1).then_some(EventKind::RoomOccupied),
            )
        } else {
            (
                EventKind::MemberLeft,
                (online == 0).then_some(EventKind::RoomVacated),
            )
        };
        let now = crate::hub::now_ms();
        // Occupied before its first member joined; vacated after its last one left.
        if joined && let Some(kind) = occupancy.filter(|k| self.webhooks(*k).is_some()) {
            self.emit(Event::room(kind, room.as_str(), now));
        }
        if self.webhooks(member).is_some() {
            self.emit(Event::member(member, room.as_str(), user, now, online));
        }
        if !joined && let Some(kind) = occupancy.filter(|k| self.webhooks(*k).is_some()) {
            self.emit(Event::room(kind, room.as_str(), now));
        }
        online
    }

    fn emit(&self, event: Event) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.emit(event);
        }
    }

    /// Keeps recovery state `state` under `pid` for `ttl`; with the table full (and nothing
    /// expired), the state is not kept and that session cannot be recovered.
    pub fn save_recovery(&self, pid: &str, state: &str, ttl: Duration) {
        let mut table = self
            .recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if table.len() >= MAX_RECOVERIES && !table.contains_key(pid) {
            table.retain(|_, (until, _)| *until > now);
            if table.len() >= MAX_RECOVERIES {
                return;
            }
        }
        table.insert(pid.to_owned(), (now + ttl, state.to_owned()));
    }

    /// Keeps the state under `pid` for `ttl` more.
    pub fn touch_recovery(&self, pid: &str, ttl: Duration) {
        let mut table = self
            .recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((until, _)) = table.get_mut(pid) {
            *until = Instant::now() + ttl;
        }
    }

    /// Takes the state under `pid`, if it has not expired.
    pub fn take_recovery(&self, pid: &str) -> Option<String> {
        let mut table = self
            .recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (until, state) = table.remove(pid)?;
        (until > Instant::now()).then_some(state)
    }

    /// The hub it delivers to.
    pub(super) fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Closes `user`'s connections; returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        self.hub.close_user(
            user,
            close_code::DISCONNECTED,
            "disconnected by the application",
        )
    }

    /// The users in `room`.
    pub fn online(&self, room: &RoomName) -> usize {
        self.hub.user_count(room.as_str())
    }

    /// Up to `limit` of `room`'s members in name order, after the name `cursor`.
    pub fn presence_page(
        &self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> presence::Page {
        local_presence::page(&self.hub, room, cursor, limit)
    }

    /// Up to `limit` messages of `room` older than `before` (the newest when `None`).
    pub fn page(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Page {
        let log = self.log(room);
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        log.expire(Instant::now(), self.ttl());
        let older: Vec<&Stored> = log
            .history
            .iter()
            .filter(|m| before.is_none_or(|b| m.id() < b))
            .collect();
        let skip = older.len().saturating_sub(limit);
        Page {
            epoch: log.epoch.to_string(),
            messages: older[skip..].iter().map(|m| m.message.clone()).collect(),
            more: skip > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Draft;

    #[tokio::test(start_paused = true)]
    async fn idle_rooms_are_forgotten_once_their_history_expired() {
        let hub = Arc::new(Hub::default());
        let policy = RoomsConfig {
            history_ttl_secs: 60,
            dedupe_window_secs: 30,
            ..RoomsConfig::default()
        };
        let transport = MemoryTransport::new(hub, policy);
        let room = RoomName::new("once").unwrap();
        let envelope = Envelope {
            draft: Draft::new(room.clone(), "ann".into(), 1, "hi".into()),
            dedupe: Some("ann\u{1f}r1".into()),
        };
        assert_eq!(transport.publish(envelope).id, 1);
        let sweep = |t: &MemoryTransport| {
            let mut rooms = t.rooms.lock();
            t.sweep(&mut rooms);
            rooms.len()
        };
        assert_eq!(sweep(&transport), 1, "history still held");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(sweep(&transport), 0, "expired and nobody in it");
        // The room starts again, in a new epoch.
        let again = transport.snapshot(&room, None);
        assert_eq!((again.last_id, again.messages.len()), (0, 0));
    }
}
