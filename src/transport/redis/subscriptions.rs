//! Which rooms this node receives: the rooms it wants (those with local members, a join on
//! its way, or a leave still lingering) and the ones the subscriber connection has
//! confirmed. A join holds its room from `subscribe` until the hub has the member; a join
//! cancelled before that, or the last member's leave, gives the room up after
//! `redis.unsubscribe_linger_secs`. The subscriber loop turns the difference into
//! `SUBSCRIBE` and `UNSUBSCRIBE` commands.

use std::collections::{HashMap, HashSet};
use std::sync::{MutexGuard, PoisonError};

use tokio::time::Instant;

use super::{RedisTransport, SUBSCRIBE_WAIT};
use crate::protocol::RoomName;

/// This node's interest in a room: since when it wants it, and what still holds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Interest {
    pub(super) since: Instant,
    /// Set when the last local member left: unsubscribe once the linger is over.
    pub(super) release_at: Option<Instant>,
    /// Joins between `subscribe` and the hub: the room is kept for them.
    pub(super) joins_pending: usize,
}

/// A join's hold on its room, from [`RedisTransport::subscribe`] until the hub has the member
/// ([`Joining::joined`]); dropped before that, it gives the room up.
#[derive(Debug)]
pub struct Joining<'a> {
    transport: &'a RedisTransport,
    room: RoomName,
    joined: bool,
}

impl Joining<'_> {
    /// The hub has the member: from now on its leave gives the room up.
    pub fn joined(mut self) {
        self.joined = true;
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        self.transport.join_ended(&self.room, self.joined);
    }
}

impl RedisTransport {
    /// Wants `room`'s messages; returns once subscribed (or after a short wait if Redis is
    /// down: the subscription follows when it is back). The room is held for the join until
    /// the returned [`Joining`] is dropped: if the hub did not get the member by then (the
    /// join was cancelled, even while this waits), the room is given up as a leave would.
    pub async fn subscribe(&self, room: &RoomName) -> Joining<'_> {
        let now = Instant::now();
        {
            let mut wanted = self.lock_wanted();
            let interest = wanted.entry(room.clone()).or_insert(Interest {
                since: now,
                release_at: None,
                joins_pending: 0,
            });
            interest.since = now;
            interest.release_at = None;
            interest.joins_pending += 1;
        }
        let joining = Joining {
            transport: self,
            room: room.clone(),
            joined: false,
        };
        if self.lock_subscribed().contains(room) {
            return joining;
        }
        self.reconcile_needed.notify_one();
        let mut version = self.subscribed_version.subscribe();
        let confirmed = async {
            while !self.lock_subscribed().contains(room) {
                if version.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT, confirmed).await;
        joining
    }

    /// A join of `room` ended: with the member in the hub (`joined`), whose leave gives the
    /// room up, or without (cancelled), when the room is given up now unless another join is
    /// under way or a member is there.
    fn join_ended(&self, room: &RoomName, joined: bool) {
        let mut wanted = self.lock_wanted();
        let Some(interest) = wanted.get_mut(room) else {
            return;
        };
        interest.joins_pending = interest.joins_pending.saturating_sub(1);
        if !joined && interest.joins_pending == 0 && self.hub.members(room.as_str()) == 0 {
            interest.release_at = Some(Instant::now() + self.linger);
            drop(wanted);
            self.reconcile_needed.notify_one();
        }
    }

    /// The last local member left `room`: unsubscribe after the linger.
    pub fn unsubscribe(&self, room: &RoomName) {
        if let Some(interest) = self.lock_wanted().get_mut(room) {
            interest.release_at = Some(Instant::now() + self.linger);
        }
        self.reconcile_needed.notify_one();
    }

    pub(super) fn lock_wanted(&self) -> MutexGuard<'_, HashMap<RoomName, Interest>> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lock_subscribed(&self) -> MutexGuard<'_, HashSet<RoomName>> {
        self.subscribed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{EventStreamConfig, RedisConfig, RoomsConfig, WebhooksConfig};
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::webhooks::Webhooks;

    /// A transport of a Redis that is not there: subscriptions are never confirmed.
    fn unreachable() -> Arc<RedisTransport> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = RedisConfig {
            host: "127.0.0.1".into(),
            port,
            ..RedisConfig::default()
        };
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let webhooks = Webhooks::spawn(
            &WebhooksConfig::default(),
            &EventStreamConfig::default(),
            "test-node",
            metrics.clone(),
        );
        RedisTransport::spawn(
            &config,
            &RoomsConfig::default(),
            "test-node",
            "127.0.0.1:1",
            hub,
            metrics,
            webhooks,
            0,
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_cancelled_while_subscribing_gives_the_room_up() {
        let transport = unreachable();
        let room = RoomName::new("r").unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), transport.subscribe(&room));
        assert!(waited.await.is_err(), "the join was still waiting");
        let interest = transport.lock_wanted()[&room];
        assert!(interest.release_at.is_some() && interest.joins_pending == 0);
        // A join that gets its member into the hub keeps the room for it.
        transport.subscribe(&room).await.joined();
        let interest = transport.lock_wanted()[&room];
        assert!(interest.release_at.is_none() && interest.joins_pending == 0);
    }
}
