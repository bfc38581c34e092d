//! `search`: full-text search over a room's archived messages, for members of the room, at
//! the request rate; answered from the PostgreSQL archive (docs/archive.md), newest first, in
//! pages cut to half the connection's queue like history pages.

use std::sync::Arc;

use super::{Chat, Protocol};
use crate::archive::SearchCursor;
use crate::protocol::message::Message;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};

/// One page of search results.
pub(crate) struct SearchPage {
    /// Newest first.
    pub(crate) messages: Vec<Arc<Message>>,
    /// Where the next page starts; `None` on the last page.
    pub(crate) cursor: Option<String>,
}

impl<P: Protocol> Chat<P> {
    /// Up to `limit` messages of `room` matching `query`, newest first, after `cursor`.
    pub(crate) async fn search(
        &mut self,
        room: &RoomName,
        query: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SearchPage, ProtocolError> {
        self.take_request()?;
        self.check_member(room)?;
        let Some(archive) = &self.node.archive else {
            return Err(ProtocolError::new(
                ErrorCode::Unavailable,
                "search needs the message archive, which this server does not keep",
            ));
        };
        let cursor = cursor.map(decode_cursor).transpose()?;
        let found = archive
            .search(room, query, cursor.as_ref(), limit + 1)
            .await
            .map_err(|e| {
                ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("search in room {room} is unavailable: {e}"),
                )
            })?;
        let more = found.len() > limit;
        let mut messages: Vec<Arc<Message>> = found.into_iter().take(limit).map(Arc::new).collect();
        // Cut to what fits in half the queue, newest first; the client pages on from there.
        let budget = self.outbox.max_bytes() / 2;
        let mut used = 256 + query.len();
        let fits = messages
            .iter()
            .position(|m| {
                used += m.json().len() + 1;
                used > budget
            })
            .map_or(messages.len(), |at| at.max(1));
        let cut = fits < messages.len();
        messages.truncate(fits);
        let cursor = (more || cut)
            .then(|| {
                messages
                    .last()
                    .map(|m| encode_cursor(&SearchCursor::after(m)))
            })
            .flatten();
        self.outbox.wait_room().await;
        Ok(SearchPage { messages, cursor })
    }
}

/// `ts.id.epoch`: opaque to clients.
fn encode_cursor(cursor: &SearchCursor) -> String {
    format!("{}.{}.{}", cursor.ts, cursor.id, cursor.epoch)
}

fn decode_cursor(text: &str) -> Result<SearchCursor, ProtocolError> {
    let bad = || {
        ProtocolError::new(
            ErrorCode::BadField,
            "`cursor` must be one a search page returned",
        )
    };
    let mut parts = text.splitn(3, '.');
    let ts = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let id = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let epoch = parts.next().filter(|e| !e.is_empty()).ok_or_else(bad)?;
    Ok(SearchCursor {
        ts,
        epoch: epoch.to_owned(),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_and_bad_ones_are_refused() {
        let cursor = SearchCursor {
            ts: 17,
            epoch: "ab.c".into(),
            id: 3,
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        for bad in ["", "1", "1.2", "1.2.", "x.2.e", "1.-2.e"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
