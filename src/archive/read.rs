//! Reading the archive back: a page of a room's messages older than an id (history past
//! the hot window), the messages after a position (recovery past it), a room's newest
//! position (to continue its ids after a restart), and full-text search. Every value is a
//! bound parameter; a search query is read by `websearch_to_tsquery`, which accepts any text
//! (quotes, operators, punctuation) without a syntax error.

use std::sync::Arc;

use tokio_postgres::Row;

use super::{Archive, ArchiveError};
use crate::archive::writer::to_i64;
use crate::protocol::RoomName;
use crate::protocol::message::{Draft, Message};

/// A room's newest archived message: its epoch and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The epoch of the room's newest archived message.
    pub epoch: String,
    /// The greatest id archived in that epoch.
    pub last_id: u64,
}

/// Where a page of search results ended: the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchCursor {
    /// The last result's time (ms since the Unix epoch).
    pub ts: u64,
    /// Its epoch.
    pub epoch: String,
    /// Its id.
    pub id: u64,
}

impl SearchCursor {
    /// The cursor just past `message`.
    pub fn after(message: &Message) -> Self {
        Self {
            ts: message.ts(),
            epoch: message.epoch().to_owned(),
            id: message.id(),
        }
    }
}

/// The most rows one read returns.
const MAX_LIMIT: usize = 1000;

/// A row of `id, epoch, ts, "user", text` as a message of `room`.
fn message(room: &RoomName, row: &Row) -> Message {
    let id: i64 = row.get(0);
    let epoch: String = row.get(1);
    let ts: i64 = row.get(2);
    let user: String = row.get(3);
    let text: String = row.get(4);
    Draft::new(
        room.clone(),
        Arc::from(user),
        u64::try_from(ts).unwrap_or(0),
        text,
    )
    .accept(u64::try_from(id).unwrap_or(0), Arc::from(epoch))
}

fn limit(n: usize) -> i64 {
    to_i64(n.clamp(1, MAX_LIMIT) as u64)
}

impl Archive {
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, ArchiveError> {
        let timeout = self.shared.timeout;
        let read = async {
            let client = self
                .shared
                .pool
                .get()
                .await
                .map_err(|e| ArchiveError::Pool(e.to_string()))?;
            let statement = client.prepare_cached(sql).await?;
            Ok::<_, ArchiveError>(client.query(&statement, params).await?)
        };
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or(Err(ArchiveError::Timeout(timeout)))
    }

    /// Up to `limit` messages of `room` in `epoch` with ids below `before`, oldest first, and
    /// whether older ones are archived.
    pub async fn page(
        &self,
        room: &RoomName,
        epoch: &str,
        before: u64,
        limit_: usize,
    ) -> Result<(Vec<Message>, bool), ArchiveError> {
        let rows = self
            .query(
                "SELECT id, epoch, ts, \"user\", text FROM scalechat_messages \
                 WHERE room = $1 AND epoch = $2 AND id < $3 ORDER BY id DESC LIMIT $4",
                &[
                    &room.as_str(),
                    &epoch,
                    &to_i64(before),
                    &(limit(limit_) + 1),
                ],
            )
            .await?;
        let more = rows.len() > limit(limit_) as usize;
        let mut page: Vec<Message> = rows
            .iter()
            .take(limit(limit_) as usize)
            .map(|row| message(room, row))
            .collect();
        page.reverse();
        Ok((page, more))
    }

    /// Up to `limit` messages of `room` in `epoch` with ids above `after`, oldest first: for
    /// a client recovering from `after`. Whether they are all it missed is
    /// [`is_consecutive_from`]'s to say.
    pub async fn after(
        &self,
        room: &RoomName,
        epoch: &str,
        after: u64,
        limit_: usize,
    ) -> Result<Vec<Message>, ArchiveError> {
        let rows = self
            .query(
                "SELECT id, epoch, ts, \"user\", text FROM scalechat_messages \
                 WHERE room = $1 AND epoch = $2 AND id > $3 ORDER BY id LIMIT $4",
                &[&room.as_str(), &epoch, &to_i64(after), &limit(limit_)],
            )
            .await?;
        Ok(rows.iter().map(|row| message(room, row)).collect())
    }

    /// The room's newest archived position: the epoch of its newest message (by time) and the
    /// greatest id archived in it. `None` for a room never archived.
    pub async fn position(&self, room: &RoomName) -> Result<Option<Position>, ArchiveError> {
        let rows = self
            .query(
                "SELECT newest.epoch, (SELECT max(id) FROM scalechat_messages m \
                    WHERE m.room = $1 AND m.epoch = newest.epoch) \
                 FROM (SELECT epoch FROM scalechat_messages WHERE room = $1 \
                    ORDER BY ts DESC LIMIT 1) AS newest",
                &[&room.as_str()],
            )
            .await?;
        Ok(rows.first().map(|row| Position {
            epoch: row.get(0),
            last_id: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        }))
    }

    /// Every archived room's newest position (see [`Archive::position`]), for a node on the
    /// embedded transport to continue its rooms' ids after a restart. Rooms whose name is no
    /// longer valid are left out.
    pub async fn positions(&self) -> Result<Vec<(RoomName, Position)>, ArchiveError> {
        let rows = self
            .query(
                "SELECT DISTINCT ON (room) room, epoch, id FROM scalechat_messages \
                 ORDER BY room, ts DESC, id DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let room = RoomName::new(row.get::<_, &str>(0)).ok()?;
                let position = Position {
                    epoch: row.get(1),
                    last_id: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                };
                Some((room, position))
            })
            .collect())
    }

    /// Up to `limit` messages of `room` matching `query` (web-search syntax: words, "quoted
    /// phrases", `or`, `-word`), newest first, after `cursor` when paging on. Any text is a
    /// valid query; one with no words matches nothing.
    pub async fn search(
        &self,
        room: &RoomName,
        query: &str,
        cursor: Option<&SearchCursor>,
        limit_: usize,
    ) -> Result<Vec<Message>, ArchiveError> {
        // PostgreSQL text cannot hold NUL.
        let query = query.replace('\0', " ");
        let rows = match cursor {
            None => {
                self.query(
                    "SELECT id, epoch, ts, \"user\", text FROM scalechat_messages \
                     WHERE room = $1 AND search @@ websearch_to_tsquery('simple', $2) \
                     ORDER BY ts DESC, epoch DESC, id DESC LIMIT $3",
                    &[&room.as_str(), &query, &limit(limit_)],
                )
                .await?
            }
            Some(c) => {
                self.query(
                    "SELECT id, epoch, ts, \"user\", text FROM scalechat_messages \
                     WHERE room = $1 AND search @@ websearch_to_tsquery('simple', $2) \
                     AND (ts, epoch, id) < ($4, $5, $6) \
                     ORDER BY ts DESC, epoch DESC, id DESC LIMIT $3",
                    &[
                        &room.as_str(),
                        &query,
                        &limit(limit_),
                        &to_i64(c.ts),
                        &c.epoch,
                        &to_i64(c.id),
                    ],
                )
                .await?
            }
        };
        Ok(rows.iter().map(|row| message(room, row)).collect())
    }
}

/// Whether `messages` are exactly the ids `after + 1, after + 2, …`, none missing: a
/// recovery from `after` may then say `recovered: true` up to the last of them.
pub fn is_consecutive_from(after: u64, messages: &[Message]) -> bool {
    messages
        .iter()
        .enumerate()
        .all(|(i, m)| m.id() == after + 1 + i as u64)
}
