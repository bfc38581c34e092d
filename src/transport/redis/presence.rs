//! Presence across nodes. Per room, Redis holds each user's connections over every node
//! (`pres:<room>`), when they came (`pres-since:<room>`) and each node's share
//! (`pres-node:<room>:<node>`); every node registers in `presence-nodes` (a sorted set of
//! deadlines) and lists its rooms in `presence-rooms:<node>`.
//!
//! One task per node writes this node's share: a join or leave marks the (room, user) pair,
//! and the task sets the pair's count to what the hub holds at that moment, in one script per
//! room, which publishes `member_joined` / `member_left` changes on the presence channel when a
//! user's count over every node leaves or reaches zero. Every node listens on that channel
//! and hands the changes of rooms with local members to its hub. The same task renews the
//! node's deadline every third of `rooms.presence_timeout_secs`, and removes the members of
//! nodes whose deadline passed (a crash, a node cut off from Redis), so no member outlives
//! its node by more than the timeout and a heartbeat. A node that finds its registration gone
//! (Redis restarted, or it was taken for dead) writes its whole share again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use redis::Script;
use tokio::sync::{Notify, oneshot};
use tracing::{debug, info, warn};

use super::RedisTransport;
use super::connect::Backoff;
use crate::hub::{Change as HubChange, now_ms};
use crate::protocol::RoomName;
use crate::protocol::presence::{Change, Changes, MAX_CURSOR_LEN, Member, Page};
use crate::transport::{RoomList, TransportError, local_presence};
use crate::webhooks::{Event, EventKind};

/// Sets this node's connections of users in a room; publishes the changes of who is in it;
/// lists the room among the node's rooms while the node has users in it.
/// KEYS: pres, pres-since, pres-node, presence-rooms (of this node). ARGV: channel, room,
/// `1` when the node has users in the room (else `0`), `1` to have the changes answered
/// (else `0`), then (user, count, since) triples, each user at most once, numbers in decimal.
/// Returns the users in the room and the changes it published, once per call, in the form
/// [`Changes::decode`] reads (`false` when nothing changed or they were not asked for).
///
/// A user is a field of `pres` exactly while their count over every node is above zero, so
/// the room's count is read once and follows the changes rather than being read for each.
/// Each hash is read once and written at most twice per call (`HMGET`, then one `HSET` and
/// one `HDEL`), whatever the number of users, and the arguments' strings are passed on
/// rather than turned into numbers and back: under churn a call carries tens of users, and
/// Redis spends its time on the script's own work as much as on the commands.
const SYNC_LUA: &str = r"
local online = redis.call('HLEN', KEYS[1])
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[4], ARGV[2])
else
  redis.call('SREM', KEYS[4], ARGV[2])
end
if #ARGV < 5 then
  return {online, false}
end
local users = {}
for i = 5, #ARGV, 3 do users[#users + 1] = ARGV[i] end
local held = redis.call('HMGET', KEYS[3], unpack(users))
local node_set, node_del, moved, deltas, sinces = {}, {}, {}, {}, {}
for j = 1, #users do
  local count, old = ARGV[3 + 3 * j], held[j] or '0'
  if count ~= old then
    if count ~= '0' then
      node_set[#node_set + 1] = users[j]
      node_set[#node_set + 1] = count
    else
      node_del[#node_del + 1] = users[j]
    end
    moved[#moved + 1] = users[j]
    deltas[#deltas + 1] = tonumber(count) - tonumber(old)
    sinces[#sinces + 1] = ARGV[4 + 3 * j]
  end
end
if #moved == 0 then
  return {online, false}
end
if #node_set > 0 then redis.call('HSET', KEYS[3], unpack(node_set)) end
if #node_del > 0 then redis.call('HDEL', KEYS[3], unpack(node_del)) end
local totals = redis.call('HMGET', KEYS[1], unpack(moved))
local pres_set, pres_del, since_set, since_del = {}, {}, {}, {}
local out = {ARGV[2]}
for k = 1, #moved do
  local user = moved[k]
  local before = tonumber(totals[k] or '0')
  local total = before + deltas[k]
  if total > 0 then
    pres_set[#pres_set + 1] = user
    pres_set[#pres_set + 1] = total
    if before <= 0 then
      online = online + 1
      since_set[#since_set + 1] = user
      since_set[#since_set + 1] = sinces[k]
      out[#out + 1] = '+' .. user .. '\t' .. sinces[k] .. '\t' .. online
    end
  else
    if totals[k] then pres_del[#pres_del + 1] = user end
    if before > 0 then
      online = online - 1
      since_del[#since_del + 1] = user
      out[#out + 1] = '-' .. user .. '\t' .. online
    end
  end
end
if #pres_set > 0 then redis.call('HSET', KEYS[1], unpack(pres_set)) end
if #pres_del > 0 then redis.call('HDEL', KEYS[1], unpack(pres_del)) end
if #since_set > 0 then redis.call('HSET', KEYS[2], unpack(since_set)) end
if #since_del > 0 then redis.call('HDEL', KEYS[2], unpack(since_del)) end
if #out == 1 then
  return {online, false}
end
local published = table.concat(out, '\n')
redis.call('PUBLISH', ARGV[1], published)
if ARGV[4] == '1' then
  return {online, published}
end
return {online, false}
";

/// Removes a stopped node's share of a room. KEYS: pres, pres-since, pres-node (of that
/// node). ARGV: channel, room. Returns the changes it published, as [`SYNC_LUA`] does.
const REAP_LUA: &str = r"
local out = {ARGV[2]}
local online = redis.call('HLEN', KEYS[1])
local entries = redis.call('HGETALL', KEYS[3])
for i = 1, #entries, 2 do
  local user, count = entries[i], tonumber(entries[i + 1])
  local total = redis.call('HINCRBY', KEYS[1], user, -count)
  if total <= 0 then
    redis.call('HDEL', KEYS[1], user)
    if total + count > 0 then
      redis.call('HDEL', KEYS[2], user)
      online = online - 1
      out[#out + 1] = '-' .. user .. '\t' .. online
    end
  end
end
redis.call('DEL', KEYS[3])
if #out == 1 then
  return false
end
local published = table.concat(out, '\n')
redis.call('PUBLISH', ARGV[1], published)
return published
";

/// Most (user, count) triples one script call carries.
const SYNC_CHUNK: usize = 500;

/// Most presence writes in flight at once. A mark that finds them all taken waits for one
/// to be answered before its write starts: under connection churn on a busy machine, with 4
/// a join's mark waited 0.8–1.1 ms on average (2–3.5 ms at the 90th percentile) before its
/// write went out, with 16 about 0.6 ms (1.4 ms). Each is one small script on the
/// multiplexed connection; the marks made while all are taken still go out in one.
const WRITES_IN_FLIGHT: usize = 16;

/// How long a join waits for its presence to be written before answering anyway.
const JOIN_WAIT: Duration = Duration::from_secs(2);

/// The (room, user) pairs whose share must be written.
#[derive(Debug, Default)]
struct Dirty {
    rooms: HashMap<RoomName, HashSet<Arc<str>>>,
    /// Bumped by every mark; the writer reports the mark it has written up to.
    marked: u64,
    /// The joins waiting for their mark to be written, in the order of their marks: a write
    /// wakes those it covers and no other. At most one per join in progress; those that
    /// stopped waiting are dropped when the queue has doubled since it was last swept.
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    /// The queue's length at which it is swept next.
    sweep_at: usize,
}

impl Dirty {
    fn mark(&mut self, room: &RoomName, user: &Arc<str>) -> u64 {
        self.rooms
            .entry(room.clone())
            .or_default()
            .insert(user.clone());
        self.marked += 1;
        self.marked
    }
}

/// The length below which the waiters are never swept.
const WAITERS_SWEPT_FROM: usize = 64;

/// This node's presence writer and what it knows of each room's count.
pub(super) struct PresenceSync {
    /// `redis.presence`: counts, lists and events over every node; else this node's only.
    shared: bool,
    /// This node's name in the presence keys.
    pub(super) node: String,
    timeout: Duration,
    sync_script: Script,
    reap_script: Script,
    dirty: Mutex<Dirty>,
    wake: Notify,
    /// Users per room over every node, as last heard, for rooms with local members.
    online: Mutex<HashMap<RoomName, usize>>,
    /// This run has registered.
    registered: AtomicBool,
}

impl PresenceSync {
    pub(super) fn new(shared: bool, node: &str, timeout: Duration) -> Self {
        Self {
            shared,
            node: node.to_owned(),
            timeout,
            sync_script: Script::new(SYNC_LUA),
            reap_script: Script::new(REAP_LUA),
            dirty: Mutex::default(),
            wake: Notify::new(),
            online: Mutex::default(),
            registered: AtomicBool::new(false),
        }
    }

    fn mark(&self, room: &RoomName, user: &Arc<str>) -> u64 {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let marked = dirty.mark(room, user);
        drop(dirty);
        self.wake.notify_one();
        marked
    }

    /// Marks the pair, like [`PresenceSync::mark`], for a join that waits until a write
    /// covers the mark: the receiver completes then (or fails, if the writer is gone).
    fn mark_waiting(&self, room: &RoomName, user: &Arc<str>) -> oneshot::Receiver<()> {
        let (done, written) = oneshot::channel();
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let marked = dirty.mark(room, user);
        if dirty.waiters.len() >= dirty.sweep_at.max(WAITERS_SWEPT_FROM) {
            dirty.waiters.retain(|(_, done)| !done.is_closed());
            dirty.sweep_at = dirty.waiters.len() * 2;
        }
        dirty.waiters.push_back((marked, done));
        drop(dirty);
        self.wake.notify_one();
        written
    }

    /// Wakes the joins whose marks are written: those up to `marked`.
    fn written(&self, marked: u64) {
        let mut woken = Vec::new();
        {
            let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            while dirty.waiters.front().is_some_and(|(m, _)| *m <= marked) {
                woken.extend(dirty.waiters.pop_front().map(|(_, done)| done));
            }
        }
        for done in woken {
            let _ = done.send(());
        }
    }

    fn online(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, usize>> {
        self.online.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RedisTransport {
    fn presence_key(&self, kind: &str, room: &str) -> String {
        format!("{}{kind}:{room}", self.scripts.key_prefix())
    }

    /// The channel every node's presence changes go out on.
    pub(super) fn presence_channel(&self) -> &str {
        &self.presence_channel
    }

    /// See [`Transport::presence_joined`](crate::transport::Transport::presence_joined).
    pub async fn presence_changed(&self, room: &RoomName, user: &Arc<str>) -> usize {
        if !self.presence.shared {
            return local_presence::changed(&self.hub, room, user);
        }
        let written = self.presence.mark_waiting(room, user);
        let done = tokio::time::timeout(JOIN_WAIT, written).await;
        if !matches!(done, Ok(Ok(_))) {
            debug!(%room, "presence not written in time; answering with the last count");
        }
        self.online(room)
    }

    /// See [`Transport::presence_left`](crate::transport::Transport::presence_left).
    pub fn presence_left(&self, room: &RoomName, user: &Arc<str>) {
        if self.presence.shared {
            self.presence.mark(room, user);
        } else {
            local_presence::changed(&self.hub, room, user);
        }
    }

    /// See [`Transport::online`](crate::transport::Transport::online): the last count heard,
    /// at least this node's own users.
    pub fn online(&self, room: &RoomName) -> usize {
        let local = self.hub.user_count(room.as_str());
        if !self.presence.shared {
            return local;
        }
        let heard = self.presence.online().get(room).copied().unwrap_or(0);
        heard.max(local)
    }

    /// A page of `room`'s members over every node: `HSCAN` from `cursor`.
    pub async fn presence_page(
        &self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, TransportError> {
        if !self.presence.shared {
            return Ok(local_presence::page(&self.hub, room, cursor, limit));
        }
        let start = match cursor {
            None => 0,
            Some(c) if c.len() <= MAX_CURSOR_LEN => c.parse::<u64>().map_err(|_| bad_cursor())?,
            Some(_) => return Err(bad_cursor()),
        };
        let pres = self.presence_key("pres", room.as_str());
        let since = self.presence_key("pres-since", room.as_str());
        let mut scan = redis::cmd("HSCAN");
        scan.arg(&pres).arg(start).arg("COUNT").arg(limit);
        let (next, pairs): (u64, Vec<(String, u64)>) = self.scripts.query(&scan).await?;
        let mut online_cmd = redis::cmd("HLEN");
        online_cmd.arg(&pres);
        let online: usize = self.scripts.query(&online_cmd).await?;
        let sinces: Vec<Option<u64>> = if pairs.is_empty() {
            Vec::new()
        } else {
            let mut get = redis::cmd("HMGET");
            get.arg(&since);
            for (user, _) in &pairs {
                get.arg(user);
            }
            self.scripts.query(&get).await?
        };
        let members = pairs
            .into_iter()
            .zip(sinces)
            .map(|((user, connections), since)| Member {
                user: user.into(),
                connections,
                since: since.unwrap_or(0),
            })
            .collect();
        Ok(Page {
            online,
            members,
            cursor: (next != 0).then(|| next.to_string()),
        })
    }

    /// See [`Transport::rooms`](crate::transport::Transport::rooms): `SCAN` over the rooms'
    /// presence keys (this node's rooms alone when presence is not shared).
    pub async fn rooms(&self, cursor: Option<&str>) -> Result<RoomList, TransportError> {
        if !self.presence.shared {
            return Ok(local_presence::rooms(&self.hub, cursor));
        }
        let start = match cursor {
            None => 0,
            Some(c) => c.parse::<u64>().map_err(|_| bad_cursor())?,
        };
        let prefix = self.presence_key("pres", "");
        let mut scan = redis::cmd("SCAN");
        scan.arg(start)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(200);
        let (next, keys): (u64, Vec<String>) = self.scripts.query(&scan).await?;
        let mut rooms = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(room) = key
                .strip_prefix(&prefix)
                .and_then(|r| RoomName::new(r).ok())
            else {
                continue;
            };
            let mut len = redis::cmd("HLEN");
            len.arg(&key);
            rooms.push((room, self.scripts.query::<usize>(&len).await?));
        }
        Ok((rooms, (next != 0).then(|| next.to_string())))
    }

    /// The presence task: writes marked pairs, renews the node's deadline, removes stopped
    /// nodes' members. Runs for the transport's life.
    ///
    /// Writes are pipelined: a mark starts a write at once, even while earlier ones are in
    /// flight (at most [`WRITES_IN_FLIGHT`]), so a join waits for about one round trip. They
    /// go out on one connection in the order they read the hub, so Redis applies them in that
    /// order and ends with the hub's latest state.
    pub(super) async fn run_presence(self: Arc<Self>) {
        let mut renew = tokio::time::interval(self.presence.timeout / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::default();
        let mut writes = FuturesOrdered::new();
        loop {
            tokio::select! {
                () = self.presence.wake.notified(), if writes.len() < WRITES_IN_FLIGHT => {
                    // Woken by a mark: the connections ready now mark theirs first, so that
                    // one write carries them all.
                    tokio::task::yield_now().await;
                    writes.push_back(self.write_presence());
                }
                Some(written) = writes.next() => match written {
                    Ok(Some(marked)) => {
                        backoff = Backoff::default();
                        self.presence.written(marked);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.metrics.presence_errors_total.inc();
                        debug!(error = %e, "presence not written; retrying");
                        tokio::time::sleep(backoff.next()).await;
                        self.presence.wake.notify_one();
                    }
                },
                _ = renew.tick() => {
                    if let Err(e) = self.advertise(self.presence.timeout * 3).await {
                        debug!(error = %e, "internal address not advertised");
                    }
                    if !self.presence.shared {
                        continue;
                    }
                    if let Err(e) = self.renew_presence().await {
                        self.metrics.presence_errors_total.inc();
                        debug!(error = %e, "presence not renewed");
                    }
                    // What renewing marked (a whole share to write again).
                    self.presence.wake.notify_one();
                }
            }
        }
    }

    /// Writes every marked pair: this node's connections of the user in the room, as the hub
    /// holds them now. Pairs not written are marked again. Answers the mark written up to,
    /// `None` when nothing was marked.
    async fn write_presence(&self) -> Result<Option<u64>, TransportError> {
        let (rooms, marked) = {
            let mut dirty = self
                .presence
                .dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (std::mem::take(&mut dirty.rooms), dirty.marked)
        };
        if rooms.is_empty() {
            return Ok(None);
        }
        let mut failed = None;
        let mut rooms = rooms.into_iter();
        for (room, users) in rooms.by_ref() {
            if let Err(e) = self.write_room(&room, &users).await {
                let mut dirty = self
                    .presence
                    .dirty
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                dirty.rooms.entry(room).or_default().extend(users);
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            let mut dirty = self
                .presence
                .dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (room, users) in rooms {
                dirty.rooms.entry(room).or_default().extend(users);
            }
            return Err(e);
        }
        Ok(Some(marked))
    }

    async fn write_room(
        &self,
        room: &RoomName,
        users: &HashSet<Arc<str>>,
    ) -> Result<(), TransportError> {
        let now = now_ms();
        let name = room.as_str();
        let users: Vec<&Arc<str>> = users.iter().collect();
        let rooms_key = self.presence_key("presence-rooms", &self.presence.node);
        let listed = if self.hub.user_count(name) > 0 {
            "1"
        } else {
            "0"
        };
        // The changes come back only for the webhooks; the hubs hear them on the channel.
        let answer = self.reports_changes();
        let mut online = 0;
        for chunk in users.chunks(SYNC_CHUNK) {
            let mut call = self
                .presence
                .sync_script
                .key(self.presence_key("pres", name));
            call.key(self.presence_key("pres-since", name))
                .key(self.presence_key("pres-node", &format!("{name}:{}", self.presence.node)))
                .key(&rooms_key)
                .arg(self.presence_channel())
                .arg(name)
                .arg(listed)
                .arg(if answer { "1" } else { "0" });
            for user in chunk {
                let local = self.hub.local_user(name, user);
                call.arg(user.as_ref())
                    .arg(local.map_or(0, |l| l.connections))
                    .arg(local.map_or(now, |l| l.since));
            }
            let changes: Option<Vec<u8>>;
            (online, changes) = self.scripts.run(call).await?;
            self.metrics.presence_writes_total.inc();
            self.report(changes.as_deref());
        }
        let mut known = self.presence.online();
        if self.hub.members(name) > 0 {
            known.insert(room.clone(), online);
        } else {
            known.remove(room);
        }
        Ok(())
    }

    /// Renews this node's deadline; rewrites its whole share if its registration was gone;
    /// removes the members of nodes whose deadline passed.
    async fn renew_presence(&self) -> Result<(), TransportError> {
        let nodes = self.presence_key("presence-nodes", "all");
        let now = now_ms();
        let deadline = now + self.presence.timeout.as_millis() as u64;
        let mut renew = redis::cmd("ZADD");
        renew
            .arg(&nodes)
            .arg("XX")
            .arg("CH")
            .arg(deadline)
            .arg(&self.presence.node);
        let renewed: u64 = self.scripts.query(&renew).await?;
        // At the first renewal, a registration under this name is a previous run's.
        let first = !self.presence.registered.swap(true, Ordering::AcqRel);
        if renewed == 0 || first {
            // New, or forgotten: whatever Redis holds of this node's share is stale.
            self.reap_node(&self.presence.node).await?;
            let mut marked = 0;
            for room in self.hub.room_names() {
                for (user, _) in self.hub.local_users(room.as_str()) {
                    marked = self.presence.mark(&room, &user);
                }
            }
            let mut register = redis::cmd("ZADD");
            register.arg(&nodes).arg(deadline).arg(&self.presence.node);
            self.scripts.query::<()>(&register).await?;
            info!(node = %self.presence.node, rooms_marked = marked, "presence registered");
        }
        let mut expired = redis::cmd("ZRANGEBYSCORE");
        expired
            .arg(&nodes)
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(16);
        let stopped: Vec<String> = self.scripts.query(&expired).await?;
        for node in stopped.iter().filter(|n| **n != self.presence.node) {
            warn!(node = %node, "a node stopped renewing its presence: removing its members");
            self.reap_node(node).await?;
            self.metrics.presence_nodes_removed_total.inc();
            let mut forget = redis::cmd("ZREM");
            forget.arg(&nodes).arg(node);
            self.scripts.query::<()>(&forget).await?;
        }
        Ok(())
    }

    /// Removes `node`'s share of every room it listed.
    async fn reap_node(&self, node: &str) -> Result<(), TransportError> {
        let rooms_key = self.presence_key("presence-rooms", node);
        let mut list = redis::cmd("SMEMBERS");
        list.arg(&rooms_key);
        let rooms: Vec<String> = self.scripts.query(&list).await?;
        for room in &rooms {
            let mut call = self
                .presence
                .reap_script
                .key(self.presence_key("pres", room));
            call.key(self.presence_key("pres-since", room))
                .key(self.presence_key("pres-node", &format!("{room}:{node}")))
                .arg(self.presence_channel())
                .arg(room);
            let changes: Option<Vec<u8>> = self.scripts.run(call).await?;
            self.report(changes.as_deref());
        }
        let mut forget = redis::cmd("DEL");
        forget.arg(&rooms_key);
        self.scripts.query::<()>(&forget).await
    }

    /// A webhook wants presence changes.
    fn reports_changes(&self) -> bool {
        [
            EventKind::RoomOccupied,
            EventKind::MemberJoined,
            EventKind::MemberLeft,
            EventKind::RoomVacated,
        ]
        .into_iter()
        .any(|kind| self.webhooks.wants(kind))
    }

    /// Reports the changes this node's script made to the webhooks: each change is made (and
    /// so reported) by exactly one script run. A room whose users went from none to one was
    /// occupied, from one to none vacated.
    fn report(&self, changes: Option<&[u8]>) {
        let Some(changes) = changes else { return };
        if !self.reports_changes() {
            return;
        }
        let runs = match Changes::decode(changes) {
            Ok(runs) => runs,
            Err(e) => return warn!(error = %e, "the presence script answered malformed changes"),
        };
        let now = now_ms();
        for run in &runs {
            for change in &run.changes {
                self.report_change(&run.room, change, now);
            }
        }
    }

    /// The webhook events of one change of `room`.
    fn report_change(&self, room: &str, change: &Change, now: u64) {
        let webhooks = &self.webhooks;
        let user = &change.user;
        if change.joined {
            if change.online == 1 && webhooks.wants(EventKind::RoomOccupied) {
                webhooks.emit(Event::room(EventKind::RoomOccupied, room, now));
            }
            if webhooks.wants(EventKind::MemberJoined) {
                let event = Event::member(EventKind::MemberJoined, room, user, now, change.online);
                webhooks.emit(event);
            }
        } else {
            if webhooks.wants(EventKind::MemberLeft) {
                let event = Event::member(EventKind::MemberLeft, room, user, now, change.online);
                webhooks.emit(event);
            }
            if change.online == 0 && webhooks.wants(EventKind::RoomVacated) {
                webhooks.emit(Event::room(EventKind::RoomVacated, room, now));
            }
        }
    }

    /// Changes heard on the presence channel (which the subscriber connection listens to),
    /// one script run's: those of rooms with local members go to the hub (and are made into
    /// events only where a local member asked for them).
    pub(super) fn heard(&self, payload: &[u8]) {
        let runs = match Changes::decode(payload) {
            Ok(runs) => runs,
            Err(e) => return warn!(error = %e, "the presence channel carried malformed changes"),
        };
        for run in runs {
            let Some(room) = RoomName::new(&run.room)
                .ok()
                .filter(|r| self.hub.members(r.as_str()) > 0)
            else {
                continue;
            };
            let Some(last) = run.changes.last() else {
                continue;
            };
            self.presence.online().insert(room.clone(), last.online);
            if !self.hub.presence_watched(room.as_str()) {
                continue;
            }
            for change in run.changes {
                let user: Arc<str> = change.user.into();
                let hub_change = if change.joined {
                    HubChange::Joined {
                        user,
                        since: change.since,
                    }
                } else {
                    HubChange::Left { user }
                };
                self.hub.record_presence(&room, hub_change, change.online);
            }
        }
    }
}

fn bad_cursor() -> TransportError {
    TransportError::BadRequest("`cursor` must be one a presence page returned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync() -> PresenceSync {
        PresenceSync::new(true, "n1", Duration::from_secs(30))
    }

    #[test]
    fn a_write_wakes_only_the_joins_it_covers() {
        let sync = sync();
        let room = RoomName::new("dev").expect("room name");
        let mut first = sync.mark_waiting(&room, &"ann".into());
        let mut second = sync.mark_waiting(&room, &"bob".into());
        sync.written(1);
        assert!(first.try_recv().is_ok());
        assert!(matches!(
            second.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        sync.written(2);
        assert!(second.try_recv().is_ok());
    }

    #[test]
    fn joins_that_stopped_waiting_are_swept() {
        let sync = sync();
        let room = RoomName::new("dev").expect("room name");
        let user: Arc<str> = "ann".into();
        for _ in 0..10 * WAITERS_SWEPT_FROM {
            drop(sync.mark_waiting(&room, &user));
        }
        let _waiting = sync.mark_waiting(&room, &user);
        let dirty = sync.dirty.lock().expect("dirty lock");
        assert!(dirty.waiters.len() <= WAITERS_SWEPT_FROM + 1);
    }
}
