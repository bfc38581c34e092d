//! The native protocol's requests: each client frame decoded into a [`Request`], handed to
//! the [chat core](crate::chat), and its answer encoded as the protocol's reply; and the echo
//! endpoint, which only sends messages back. A `send` is handed over at once, and the
//! connection reads on while it is published (see [`Pipeline`](crate::chat::Pipeline)); any
//! other request waits until the sends before it are answered.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::Params;
use crate::chat::{Chat, Join, Joined, Protocol, Sent};
use crate::hub::ConnId;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::protocol::message::Codec;
use crate::protocol::native::{self, Reply, Request, Since};
use crate::protocol::{ProtocolError, RoomName, RoomRef, presence, ws};

/// The native protocol, as the chat core sees it.
pub(crate) struct Native;

impl Protocol for Native {
    const CODEC: Codec = Codec::Native;

    /// The `send`'s `ref`, echoed in its `ack` or `error`.
    type SendTag = Option<String>;

    fn sent(reference: Option<String>, answer: Result<Sent, ProtocolError>) -> Option<Bytes> {
        let reference = reference.as_deref();
        Some(match answer {
            Ok(sent) => Reply::Ack {
                reference,
                room: &sent.room,
                id: sent.published.id,
                duplicate: sent.published.duplicate,
            }
            .frame(),
            Err(e) => native::error_frame(&e.with_ref(reference)),
        })
    }

    fn joined(joined: &Joined<'_>) -> Bytes {
        let history = joined.history;
        Reply::Joined {
            room: joined.room,
            online: joined.online,
            epoch: history.map(|s| s.epoch.as_str()),
            last_id: history.map(|s| s.last_id),
            history: history.map_or(0, |s| s.messages.len()),
            recovered: joined.recovered(),
            dm: joined.direct,
            read_only: joined.read_only,
        }
        .frame()
    }

    fn already_joined(room: &RoomName, online: usize) -> Option<Bytes> {
        Some(
            Reply::Joined {
                room,
                online,
                epoch: None,
                last_id: None,
                history: 0,
                recovered: None,
                dm: None,
                read_only: false,
            }
            .frame(),
        )
    }

    fn error(err: &ProtocolError) -> Bytes {
        native::error_frame(err)
    }
}

/// A request being handled, owning the session until it hands it back.
pub(super) type Handling = Pin<Box<dyn Future<Output = Session> + Send>>;

/// The reader side of a connection: the user's chat state, or the echo endpoint.
/// The user's name and first room are the chat state's (see [`Chat::user`]).
pub(super) struct Session {
    chat: Chat<Native>,
    /// Send the first room's presence events.
    presence: bool,
    /// Serving the echo endpoint.
    pub(super) echo: bool,
    /// The fragmented message being received is binary (the decoder has checked the order;
    /// only the echo endpoint takes binary messages). Kept here rather than in the
    /// connection, in what would be the session's padding.
    pub(super) binary: bool,
}

impl Session {
    pub(super) fn new(node: Arc<Node>, conn: ConnId, params: Params, outbox: Arc<Outbox>) -> Self {
        let mut chat = Chat::new(node, conn, outbox);
        chat.sign_in(params.name.into(), params.room, params.grant);
        Self {
            chat,
            presence: params.presence,
            echo: params.echo,
            binary: false,
        }
    }

    /// Greets the client and joins its first room.
    pub(super) async fn start(&mut self, since: Option<Since>) {
        if self.echo {
            return;
        }
        let Some((name, first_room)) = self.chat.user() else {
            return; // signed in when made
        };
        let first_room = first_room.clone();
        let welcome = Reply::Welcome {
            conn: &self.chat.conn().to_string(),
            name,
            node: &self.chat.node().id,
            rooms: std::slice::from_ref(&first_room),
        };
        let greeting = welcome.frame();
        let join = Join {
            room: RoomRef::Named(first_room),
            since,
            history: true,
            presence: self.presence,
        };
        // Sent with the first room's answer, in one write.
        let joined = self.chat.join_first(join, Some(greeting)).await;
        if let Err(e) = joined {
            self.refuse(&e);
        }
    }

    /// Queues `frame` for the client, after the answers of the sends before it.
    pub(super) fn reply(&self, frame: Bytes) {
        self.chat.push(frame);
    }

    /// Answers the client's ping at once.
    pub(super) fn pong(&self, payload: &[u8]) {
        self.chat.push_now(ws::pong(payload));
    }

    /// Ready while the connection may read another request (see
    /// [`Pipeline::poll_room`](crate::chat::Pipeline::poll_room)).
    pub(super) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.chat.poll_room(cx)
    }

    /// Resolves once every send so far is answered.
    pub(super) async fn drained(&self) {
        self.chat.drained().await;
    }

    fn refuse(&self, err: &ProtocolError) {
        self.chat.node().metrics.error(err.code);
        self.reply(native::error_frame(err));
    }

    /// One complete message: echoed on the echo endpoint; a `send`, handed to the chat core
    /// at once; else a request handled, once the sends before it are answered, in a future
    /// that owns the session (taken from `slot`) until it is done.
    pub(super) fn message(
        slot: &mut Option<Session>,
        binary: bool,
        payload: &[u8],
    ) -> Option<Handling> {
        let session = slot.as_mut()?;
        let request = session.decode(binary, payload)?;
        if let Request::Send {
            room,
            message,
            reference,
        } = request
        {
            session.send(room, message, reference);
            return None;
        }
        let mut session = slot.take()?;
        Some(Box::pin(async move {
            session.drained().await;
            session.handle(request).await;
            session
        }))
    }

    fn send(&mut self, room: Option<RoomName>, message: String, reference: Option<String>) {
        let key = reference.clone();
        self.chat.send(room, message, key.as_deref(), reference);
    }

    /// Echoes, or decodes the request (refusing a bad one); returns the request to handle.
    fn decode(&mut self, binary: bool, payload: &[u8]) -> Option<Request> {
        if self.echo {
            self.reply(if binary {
                ws::binary(payload)
            } else {
                ws::text(payload)
            });
            return None;
        }
        if self.chat.outbox().is_closed() {
            return None; // closing: the close handshake is all that is left
        }
        let max_chars = self.chat.live().limits.max_message_chars;
        match native::decode(payload, max_chars) {
            Ok(request) => Some(request),
            Err(err) => {
                self.refuse(&err);
                None
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        let chat = &mut self.chat;
        let answer = match request {
            Request::Join {
                room,
                since,
                presence,
            } => {
                let join = Join {
                    room,
                    since,
                    history: true,
                    presence,
                };
                chat.join(join).await.map(|_| None)
            }
            Request::Presence {
                room,
                cursor,
                limit,
            } => chat
                .presence(&room, cursor.as_deref(), limit)
                .await
                .map(|page| Some(presence::page_frame(&room, &page))),
            Request::History {
                room,
                before,
                limit,
            } => chat.history(&room, before, limit).await.map(|page| {
                Some(native::history_frame(
                    &room,
                    &page.epoch,
                    &page.messages,
                    page.more,
                ))
            }),
            Request::Search {
                room,
                query,
                cursor,
                limit,
            } => chat
                .search(&room, &query, cursor.as_deref(), limit)
                .await
                .map(|page| {
                    Some(native::search_frame(
                        &room,
                        &query,
                        &page.messages,
                        page.cursor.as_deref(),
                    ))
                }),
            Request::Send {
                room,
                message,
                reference,
            } => {
                self.send(room, message, reference);
                return;
            }
            Request::Leave { room } => chat
                .leave(&room)
                .map(|()| Some(Reply::Left { room: &room }.frame())),
        };
        match answer {
            Ok(Some(frame)) => self.reply(frame),
            Ok(None) => {}
            Err(e) => self.refuse(&e),
        }
    }
}
