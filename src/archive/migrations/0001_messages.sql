-- Every accepted chat message, once: a room's messages are numbered from 1 within an epoch.
CREATE TABLE scalechat_messages (
    room    text   NOT NULL,
    epoch   text   NOT NULL,
    id      bigint NOT NULL,
    -- When the node accepted it: milliseconds since the Unix epoch, as in the protocol.
    ts      bigint NOT NULL,
    "user"  text   NOT NULL,
    text    text   NOT NULL,
    -- Full-text search: the 'simple' configuration lowercases words and stems nothing, so it
    -- treats every language alike.
    search  tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED,
    PRIMARY KEY (room, epoch, id)
);

-- A room's newest epoch and messages by time (continuing ids, search order).
CREATE INDEX scalechat_messages_room_ts ON scalechat_messages (room, ts);
-- Retention: the oldest messages of every room.
CREATE INDEX scalechat_messages_ts ON scalechat_messages (ts);
CREATE INDEX scalechat_messages_search ON scalechat_messages USING gin (search);
