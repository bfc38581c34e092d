// scalechat web client: one WebSocket speaking the native protocol (docs/protocol.md), a small
// state object, and render functions that build the DOM with textContent only (never HTML).

const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const DIRECT_RE = /^dm-[0-9a-fA-F]{32}$/; // a direct-message room: joined with `dm` only
const MAX_DIRECTS = 100; // direct-message rooms remembered across reloads
const MAX_NAME_CHARS = 32;
const BACKOFF_START_MS = 250;
const BACKOFF_CAP_MS = 5000;
const RETRY_UNAVAILABLE_MS = 1000;
const MAX_UNAVAILABLE_TRIES = 5;
const MAX_ITEMS_PER_ROOM = 500; // older messages are dropped from memory and the page
const MAX_OUTBOX = 100; // unsent messages held while offline: no unbounded queues
const HISTORY_PAGE = 50; // older messages asked for per "load older messages"
const SEARCH_PAGE = 20; // search results asked for per page
const HISTORY_TIMEOUT_MS = 10_000; // a page request without an answer may be asked again
const MEMBERS_PAGE = 200; // members asked for per `presence` request (the server's maximum)
const MAX_MEMBERS = 1000; // names listed per room; beyond them the panel says "and N more"
const PRESENCE_TIMEOUT_MS = 10_000; // a member page without an answer: the list is asked again
const RECHECK_START_MS = 2000; // a list that disagrees with the count is asked again after this,
const RECHECK_CAP_MS = 60_000; // doubling each time up to this

const NOT_UNDERSTOOD = 'The server did not understand the request.';
const ERROR_TEXT = {
  message_too_long: 'That message is too long to send.',
  rate_limited: 'You are sending too fast. Wait a moment and try again.',
  empty_message: 'Type something before sending.',
  bad_room: 'Room names are 1–64 letters, digits, “_”, “.” or “-”.',
  not_joined: 'You are not in that room. Join it first.',
  too_many_rooms: 'You are in too many rooms. Leave one first.',
  unavailable: 'The server could not take the message right now. Try again shortly.',
  forbidden: 'You may not join that room.',
  read_only: 'You may read this room but not write in it.',
  bad_json: NOT_UNDERSTOOD, bad_field: NOT_UNDERSTOOD, unknown_type: NOT_UNDERSTOOD, bad_ref: NOT_UNDERSTOOD,
};

const $ = (selector) => document.querySelector(selector);
const ui = {
  login: $('#login'), nameInput: $('#name-input'), loginError: $('#login-error'),
  chat: $('#chat'), me: $('#me'), status: $('#status'),
  rooms: $('#rooms'), directsTitle: $('#directs-title'), directs: $('#directs'), joinForm: $('#join-form'), joinInput: $('#join-input'),
  roomTitle: $('#room-title'), messages: $('#messages'), newMessages: $('#new-messages'),
  loadOlder: $('#load-older'),
  membersToggle: $('#members-toggle'), membersToggleCount: $('#members-toggle-count'),
  membersPanel: $('#members-panel'), membersClose: $('#members-close'), memberCount: $('#member-count'),
  membersNote: $('#members-note'), members: $('#members'), membersMore: $('#members-more'),
  searchForm: $('#search-form'), searchInput: $('#search-input'), searchResults: $('#search-results'),
  searchSummary: $('#search-summary'), searchList: $('#search-list'), searchMore: $('#search-more'),
  searchClose: $('#search-close'),
  sendForm: $('#send-form'), input: $('#message-input'), sendButton: $('#send-button'),
  composeHint: $('#compose-hint'), composeNote: $('#compose-note'), error: $('#error'),
};

// localStorage can throw (storage disabled, some private modes); the chat works without it.
const store = {
  get(key) { try { return localStorage.getItem(key); } catch { return null; } },
  set(key, value) { try { localStorage.setItem(key, value); } catch { /* not remembered */ } },
};

// A room is { dm, readOnly, online: number|null, unread, items, epoch, lastId, seen, more,
// loading, history }: `dm` is the other user of a direct-message room (null for any other room),
// which is joined with `dm` rather than its `dm-…` name; `readOnly` is whether the server said
// we may only read it;
// `epoch` is the room history's epoch and `lastId` the newest id received in it (both sent back
// with `since` when rejoining, to get exactly the messages missed); `seen` holds "epoch:id" of
// every message shown, so none is shown twice; `more` is whether older messages can be loaded
// (null: unknown); `history` counts the history messages still to come after a `joined`.
// An item is a message in the list: { id, epoch, user, ts, text, own, earlier } from the
// server, or a pending one of ours that also has { ref, room, pending: true, acked, tries,
// retry }, or a marker line { marker: 'divider' | 'gap', text }. Pending items always sit after
// confirmed ones.
// Presence: `joined` is whether the room is joined on the current connection; `members` maps
// each listed user to when they came (null: never fetched), `fresh` is whether that list was
// fetched on this connection and kept up to date by events since, `truncated` whether more
// users are in the room than MAX_MEMBERS lets us list; `fetch` is a member list being paged in
// ({ members, events, dropped, timer }: the events that arrive meanwhile are replayed on it);
// `recheck` is a timer to fetch again a list that disagrees with `online`, `recheckMs` its delay.
const state = {
  name: null, // our display name
  rooms: new Map(), // joined (or to-be-joined) rooms, in display order
  current: null, // the room in view
  search: null, // the search on screen (see searchRoom)
  outbox: [], // pending items not yet acked, in send order: resent after a reconnect
  // `join`s on this connection as { room, dm, wanted } (`room` null: a direct-message room
  // whose name is not known yet), the first room's too. The server answers each, in order, with
  // `joined` or an error (`forbidden`, `too_many_rooms`) that carries no ref, so order is how
  // we match.
  joinQueue: [],
  stuck: true, // the message list is scrolled to the newest message
  conn: 'reconnecting', // connected | reconnecting | offline
  membersOpen: false, // the member panel is shown (beside the messages, or as a drawer)
};
const newRoom = (dm = null) => ({
  dm, readOnly: false, online: null, unread: 0, items: [],
  epoch: null, lastId: null, seen: new Set(), more: null, loading: false, loadTimer: 0, history: null,
  joined: false, members: null, fresh: false, truncated: false, fetch: null, recheck: 0,
  recheckMs: RECHECK_START_MS,
});
const seenKey = (epoch, id) => `${epoch}:${id}`;

/** `since` and `epoch` for rejoining `name`, when something of it was received already. */
function resumeOf(name) {
  const room = state.rooms.get(name);
  return room?.epoch && room.lastId !== null ? { since: room.lastId, epoch: room.epoch } : {};
}

// `crypto.randomUUID` needs a secure context, which plain-http LAN deployments are not, so a
// ref is a random per-page prefix plus a counter.
const refPrefix = Array.from(crypto.getRandomValues(new Uint8Array(4)), (b) => b.toString(16).padStart(2, '0')).join('');
let refCount = 0;
const nextRef = () => `${refPrefix}-${++refCount}`;

/** One WebSocket at a time; reconnects forever with capped, jittered exponential backoff. */
class Connection {
  #ws = null;
  #attempt = 0;
  #timer = 0;
  ready = false; // from `welcome` to close: frames may be sent
  everReady = false;
  constructor({ query, onFrame, onChange }) { Object.assign(this, { query, onFrame, onChange }); }
  start() { this.#connect(); }

  /** Sends a frame if connected; returns false when it was not sent. */
  send(frame) {
    if (this.ready) this.#ws.send(JSON.stringify(frame));
    return this.ready;
  }

  /** Retries now (the browser came back online) instead of waiting out the backoff. */
  kick() {
    if (this.#ws || !this.#timer) return;
    clearTimeout(this.#timer);
    this.#connect();
  }

  #connect() {
    this.#timer = 0;
    // Relative to the page, so the chat also works behind a proxy under a path prefix.
    const url = new URL(`ws?${new URLSearchParams(this.query())}`, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url);
    this.#ws = ws;
    ws.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === 'welcome') {
        this.ready = this.everReady = true;
        this.#attempt = 0; // reset once the server has really taken us, not on TCP open
        this.onChange();
      }
      this.onFrame(frame);
    };
    ws.onclose = () => {
      this.#ws = null;
      this.ready = false;
      this.onChange();
      // "Equal jitter": half the delay fixed, half random, so clients dropped by the same
      // restart do not all come back in the same millisecond.
      const base = Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * 2 ** Math.min(this.#attempt++, 10));
      this.#timer = setTimeout(() => this.#connect(), base / 2 + Math.random() * (base / 2));
    };
  }
}

const conn = new Connection({
  query: () => {
    // The query's room is joined by name, which a direct-message room may not be.
    const room = [state.current, ...state.rooms.keys()].find((name) => name && !state.rooms.get(name)?.dm)
      ?? 'general';
    return { room, name: state.name, presence: '1', ...resumeOf(room) };
  },
  onFrame: (frame) => handlers[frame.type]?.(frame),
  onChange: onConnectionChange,
});

// ---- Server frames ----

const handlers = {
  welcome(f) {
    const first = f.rooms?.[0];
    // The server joins the first room itself and answers it like a `join`.
    state.joinQueue = first ? [{ room: first, dm: null, wanted: state.rooms.has(first) }] : [];
    // The server always puts us in one room; leave it if the user had left every room.
    if (first && !state.rooms.has(first)) conn.send({ type: 'leave', room: first });
    for (const room of state.rooms.keys()) if (room !== first) requestJoin(room);
    for (const item of state.outbox) transmit(item); // with the same refs as before the drop
  },
  joined(f) {
    const head = state.joinQueue[0];
    const request = head && (head.room === f.room || (head.dm && head.dm === f.dm)) ? state.joinQueue.shift() : null;
    let room = state.rooms.get(f.room);
    if (!room) {
      // Not ours: the automatic first room of a user who left it, or a room left meanwhile.
      if (!request?.wanted) return;
      room = addRoom(f.room, request.dm ?? (typeof f.dm === 'string' ? f.dm : null));
      switchRoom(f.room); // the user asked for this join
    }
    room.online = f.online;
    room.readOnly = f.read_only === true;
    if (f.room === state.current) renderCompose();
    if (!room.joined) {
      // Joined on this connection: what we knew of its members may be stale; fetch them again.
      Object.assign(room, { joined: true, fresh: false });
      if (f.room === state.current) fetchMembers(f.room);
    }
    // No epoch: already in the room (nothing follows), or the history could not be read.
    if (f.epoch && f.epoch !== room.epoch) {
      // A new room, or its history was reset: ids start again, older pages are unknown.
      Object.assign(room, { epoch: f.epoch, lastId: null, more: null });
    }
    // `recovered` is only there when we sent `since`: false means the messages that follow are
    // the newest, not exactly those missed, so the user must know some may be missing.
    if (f.recovered === false) {
      addItem(f.room, { marker: 'gap', text: 'Some messages may be missing: not all of those sent while you were away could be loaded.' });
    }
    const count = f.history ?? 0;
    room.history = count > 0 ? { left: count, earlier: f.recovered === undefined } : null;
    if (count === 0 && f.epoch && Number.isInteger(f.last_id)) room.lastId = Math.max(room.lastId ?? 0, f.last_id);
    renderRooms();
    if (f.room === state.current) { renderOlder(); renderMembers(); }
  },
  message(f) {
    const room = state.rooms.get(f.room);
    if (!room) return; // a room left a moment ago
    const history = room.history;
    if (history) history.left -= 1;
    else if (f.epoch && room.epoch && f.epoch !== room.epoch) {
      // The room's history was reset while we were in it.
      addItem(f.room, { marker: 'gap', text: 'The room’s history was reset: some messages may be missing.' });
      Object.assign(room, { lastId: null, more: null });
    }
    if (f.epoch) room.epoch = f.epoch;
    if (!room.seen.has(seenKey(f.epoch, f.id))) {
      const own = f.user === state.name;
      // Messages from before we joined are never the echo of something we are sending now.
      const pending = own && !history?.earlier && findPending(room, f);
      if (pending) {
        // Our own echo replaces the greyed entry, so nothing is shown twice. It also proves the
        // message was accepted, so it is not resent even if its ack is lost in a drop.
        dropFromOutbox(pending);
        removeItem(f.room, pending);
      }
      addItem(f.room, { id: f.id, epoch: f.epoch, user: f.user, ts: f.ts, text: f.message, own,
        earlier: Boolean(history?.earlier) });
    }
    if (f.epoch === room.epoch) room.lastId = Math.max(room.lastId ?? 0, f.id);
    if (history && history.left <= 0) {
      room.history = null;
      if (history.earlier) addItem(f.room, { marker: 'divider', text: 'New messages' });
      if (f.room === state.current) renderOlder();
    }
  },
  ack(f) {
    const item = state.outbox.find((x) => x.ref === f.ref);
    if (!item) return;
    dropFromOutbox(item);
    // With a multi-node transport the ack may beat the echo: keep the id to match it exactly.
    Object.assign(item, { acked: true, id: f.id, epoch: state.rooms.get(item.room)?.epoch ?? null });
    if (!f.duplicate) return;
    // A resend of a message accepted before the connection dropped: it was not delivered
    // again. Its echo is either on screen already (it came with the missed messages) or will
    // not come: show it as sent.
    if (state.rooms.get(item.room)?.seen.has(seenKey(item.epoch, item.id))) removeItem(item.room, item);
    else markSent(item);
  },
  history(f) {
    const room = state.rooms.get(f.room);
    if (!room) return;
    room.loading = false;
    clearTimeout(room.loadTimer);
    // A page of another epoch belongs to a history that was reset meanwhile: not ours.
    if (f.epoch === room.epoch && Array.isArray(f.messages)) {
      const older = f.messages
        .filter((m) => !room.seen.has(seenKey(m.epoch ?? f.epoch, m.id)))
        .map((m) => ({ id: m.id, epoch: m.epoch ?? f.epoch, user: m.user, ts: m.ts, text: m.message,
          own: m.user === state.name, earlier: true }));
      prependItems(f.room, older);
      room.more = f.more === true;
    }
    if (f.room === state.current) renderOlder();
  },
  presence(f) {
    const room = state.rooms.get(f.room);
    const fetch = room?.fetch;
    if (!fetch) return; // a room left meanwhile
    clearTimeout(fetch.timer);
    if (Number.isInteger(f.online)) room.online = f.online;
    for (const m of Array.isArray(f.members) ? f.members : []) {
      if (typeof m?.user !== 'string') continue;
      // A member who came while we paged may be on two pages: the map keeps one.
      if (fetch.members.size < MAX_MEMBERS || fetch.members.has(m.user)) fetch.members.set(m.user, m.since);
      else fetch.dropped = true;
    }
    const cursor = typeof f.cursor === 'string' ? f.cursor : null;
    if (cursor && fetch.members.size < MAX_MEMBERS) return requestMembers(f.room, cursor);
    Object.assign(room, { fetch: null, members: fetch.members, fresh: true, truncated: Boolean(cursor) || fetch.dropped });
    // Changes announced while we paged may be missing from the pages read before them.
    for (const event of fetch.events) applyMembers(room, event);
    membersChanged(f.room);
  },
  member_joined(f) { memberEvent(f); },
  member_left(f) { memberEvent(f); },
  search(f) {
    const search = state.search;
    // Only the answer to the search on screen; an older one (another room or query) is dropped.
    if (!search || f.room !== search.room || f.query !== search.query) return;
    search.pending = false;
    search.cursor = typeof f.cursor === 'string' ? f.cursor : null;
    for (const m of Array.isArray(f.messages) ? f.messages : []) {
      search.found += 1;
      ui.searchList.append(messageEl({ id: m.id, epoch: m.epoch, user: m.user, ts: m.ts,
        text: m.message, own: m.user === state.name }));
    }
    renderSearch();
  },
  error(f) {
    if (state.search?.pending && !f.ref && (f.code === 'unavailable' || f.code === 'bad_field')) {
      // The answer to our search: the archive is off or down, or the cursor is stale.
      state.search.pending = false;
      state.search.cursor = null;
      state.search.problem = f.code === 'unavailable'
        ? 'Search is not available on this server right now.' : 'That search could not be continued.';
      return renderSearch();
    }
    const item = f.ref && state.outbox.find((x) => x.ref === f.ref);
    if (item) return refused(item, f);
    if (f.code === 'too_many_rooms' || f.code === 'forbidden') {
      const request = state.joinQueue.shift();
      if (request?.wanted && request.room) leaveRoom(request.room); // a rejoin that no longer fits or is refused
      // A refused first room that is not ours: the automatic one of a user who left it.
      if (f.code === 'forbidden') return request?.wanted ? showError(forbiddenText(request)) : undefined;
    }
    if (f.code !== 'not_joined' || f.ref) showError(f); // else a `leave` that crossed a reconnect
  },
};

function forbiddenText({ room, dm }) {
  if (dm) return `You may not open a direct conversation with ${dm}.`;
  if (DIRECT_RE.test(room)) return `You may not join ${room}: open direct messages from the member list.`;
  return `You may not join #${room}.`;
}

// Oldest match first: the acked id when known, else same room, same user (ours), same text.
function findPending(room, f) {
  return room.items.find((x) => x.pending && x.acked && x.id === f.id)
    ?? room.items.find((x) => x.pending && !x.acked && x.text === f.message);
}

function refused(item, f) {
  if (f.code === 'unavailable' && item.tries < MAX_UNAVAILABLE_TRIES) {
    item.tries += 1; // stays pending; a reconnect meanwhile resends it anyway
    clearTimeout(item.retry);
    item.retry = setTimeout(() => { if (state.outbox.includes(item)) transmit(item); }, RETRY_UNAVAILABLE_MS);
    return;
  }
  dropFromOutbox(item);
  removeItem(item.room, item);
  if (!ui.input.value) ui.input.value = item.text;
  showError(f);
}

function onConnectionChange() {
  if (!conn.ready) {
    state.joinQueue = [];
    for (const item of state.outbox) clearTimeout(item.retry);
    for (const room of state.rooms.values()) {
      // Acked but dropped before the echo came: the message was delivered, so show it as sent,
      // with the id the ack gave it; if the echo comes with the missed messages it is skipped.
      for (const item of room.items.filter((x) => x.pending && x.acked)) markSent(item);
      // A history cut short is asked for again, from the last message received, on rejoin.
      room.history = null;
      room.loading = false;
      clearTimeout(room.loadTimer);
      // Events are missed while away: the member list is fetched again once rejoined.
      stopMembers(room);
      Object.assign(room, { joined: false, fresh: false });
    }
  }
  renderOlder(); // only asked for while connected
  renderMembers();
  renderStatus();
}

function markSent(item) {
  item.pending = false;
  state.rooms.get(item.room)?.seen.add(seenKey(item.epoch, item.id));
  if (item.el?.isConnected) item.el.replaceWith(itemEl(item));
}

// ---- Actions ----

function transmit(item) {
  clearTimeout(item.retry);
  conn.send({ type: 'send', room: item.room, message: item.text, ref: item.ref });
}

function dropFromOutbox(item) {
  clearTimeout(item.retry);
  const i = state.outbox.indexOf(item);
  if (i >= 0) state.outbox.splice(i, 1);
}

/** Joins (or rejoins) `room`; a direct-message room by its other user. */
function requestJoin(room) {
  const dm = state.rooms.get(room)?.dm ?? null;
  state.joinQueue.push({ room, dm, wanted: true });
  conn.send({ type: 'join', ...(dm ? { dm } : { room }), presence: true, ...resumeOf(room) });
}

// The other user sees the conversation only once they open it too, from a member list: a page
// cannot learn of a direct-message room it is not in, and the server does not announce one.
/** Opens the direct-message room with `user`: switches to it, or joins it with `dm`. */
function openDirect(user) {
  const known = [...state.rooms].find(([, room]) => room.dm === user);
  if (known) return switchRoom(known[0]);
  if (!conn.ready) return showError(`Direct messages with ${user} can be opened once connected.`);
  if (state.joinQueue.some((x) => x.dm === user && x.wanted)) return; // on its way
  ui.error.textContent = '';
  state.joinQueue.push({ room: null, dm: user, wanted: true }); // shown and switched to on `joined`
  conn.send({ type: 'join', dm: user, presence: true });
}

/** The oldest message shown in `room` of its current epoch, or null. */
function oldestId(room) {
  const ids = room.items.filter((x) => !x.marker && !x.pending && x.epoch === room.epoch).map((x) => x.id);
  return ids.length ? Math.min(...ids) : null;
}

/** The `before` for the next page of older messages, or null when there is none to ask for. */
function olderBefore(room) {
  if (!room?.epoch || room.history || room.more === false) return null;
  const before = oldestId(room) ?? (room.lastId === null ? null : room.lastId + 1);
  // Ids start at 1 in each epoch: nothing is older than message 1.
  return before !== null && before > 1 ? before : null;
}

function loadOlder() {
  const room = state.rooms.get(state.current);
  const before = olderBefore(room);
  if (before === null || room.loading || !conn.ready) return;
  room.loading = true;
  conn.send({ type: 'history', room: state.current, before, limit: HISTORY_PAGE });
  room.loadTimer = setTimeout(() => {
    room.loading = false;
    if (room === state.rooms.get(state.current)) renderOlder();
  }, HISTORY_TIMEOUT_MS);
  renderOlder();
}

function addRoom(name, dm = null) {
  const room = newRoom(dm);
  state.rooms.set(name, room);
  saveRooms();
  return room;
}

function leaveRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  state.rooms.delete(name);
  stopMembers(room);
  for (const request of state.joinQueue) if (request.room === name) request.wanted = false;
  conn.send({ type: 'leave', room: name }); // skipped while offline: a reconnect won't rejoin it
  state.outbox.filter((x) => x.room === name).forEach(dropFromOutbox);
  saveRooms();
  if (state.current === name) switchRoom(firstRoom() ?? null);
  else renderRooms();
}

function switchRoom(name) {
  state.current = name;
  const room = state.rooms.get(name);
  if (room) room.unread = 0;
  if (room && !room.fresh) fetchMembers(name);
  renderRooms();
  renderMessages();
  renderMembers();
}

const firstRoom = () => state.rooms.keys().next().value;

// Rooms are remembered by name; direct-message rooms by their name and other user (they are
// rejoined with `dm`), and only for the display name they were opened with, since another
// name has other direct-message rooms.
function saveRooms() {
  const all = [...state.rooms];
  store.set('scalechat.rooms', JSON.stringify(all.filter(([, r]) => !r.dm).map(([name]) => name)));
  store.set('scalechat.directs', JSON.stringify({ name: state.name,
    rooms: all.filter(([, r]) => r.dm).map(([room, r]) => ({ room, dm: r.dm })) }));
}

/** The direct-message rooms remembered for `name`: [{ room, dm }]. */
function savedDirects(name) {
  let saved = null;
  try { saved = JSON.parse(store.get('scalechat.directs')); } catch { /* a bad value: none */ }
  if (saved?.name !== name || !Array.isArray(saved.rooms)) return [];
  return saved.rooms.filter((x) => DIRECT_RE.test(x?.room) && typeof x.dm === 'string' && !nameProblem(x.dm))
    .slice(0, MAX_DIRECTS);
}

function sendMessage(text) {
  if (!state.current) return showError('Join a room first.');
  if (state.rooms.get(state.current)?.readOnly) return showError({ code: 'read_only' });
  if (state.outbox.length >= MAX_OUTBOX) return showError('Too many unsent messages. Wait for the connection.');
  const item = { ref: nextRef(), room: state.current, user: state.name, ts: Date.now(), text,
    own: true, pending: true, acked: false, tries: 0, retry: 0 };
  state.outbox.push(item);
  addItem(state.current, item);
  transmit(item); // if not connected it waits in the outbox and goes out on `welcome`
  return true;
}

// ---- Message list ----

// Confirmed messages go before the first pending one: pending ones stay at the bottom and the
// rest keep the server's order.
function addItem(roomName, item) {
  const room = state.rooms.get(roomName);
  const at = item.pending ? -1 : room.items.findIndex((x) => x.pending);
  const before = at < 0 ? null : room.items[at];
  if (before) room.items.splice(at, 0, item); else room.items.push(item);
  if (!item.marker && !item.pending) room.seen.add(seenKey(item.epoch, item.id));
  if (room.items.length > MAX_ITEMS_PER_ROOM) {
    removeItem(roomName, room.items[0]);
    room.more = null; // what was dropped can be loaded again
  }
  if (roomName === state.current) {
    ui.messages.insertBefore(itemEl(item), before?.el ?? null);
    if (state.stuck || item.own) scrollToEnd(); else if (!item.marker) ui.newMessages.hidden = false;
  } else if (!item.own && !item.marker && !item.earlier) {
    room.unread += 1;
    renderRooms();
  }
}

/** Puts `older` (oldest first, all older than what is shown) at the top, keeping the view. */
function prependItems(roomName, older) {
  const room = state.rooms.get(roomName);
  room.items.unshift(...older);
  for (const item of older) room.seen.add(seenKey(item.epoch, item.id));
  if (roomName !== state.current || !older.length) return;
  const m = ui.messages;
  const fromBottom = m.scrollHeight - m.scrollTop;
  m.prepend(...older.map(itemEl));
  m.scrollTop = m.scrollHeight - fromBottom;
}

function removeItem(roomName, item) {
  const items = state.rooms.get(roomName)?.items ?? [];
  const i = items.indexOf(item);
  if (i >= 0) items.splice(i, 1);
  item.el?.remove();
  if (!item.marker && !item.pending) state.rooms.get(roomName)?.seen.delete(seenKey(item.epoch, item.id));
}

function itemEl(item) {
  if (!item.marker) return messageEl(item);
  const li = el('li', `marker ${item.marker}`, item.text);
  item.el = li;
  return li;
}

function messageEl(item) {
  const li = el('li', 'msg');
  li.classList.toggle('own', item.own);
  li.classList.toggle('earlier', item.earlier === true);
  li.classList.toggle('pending', item.pending === true);
  if (item.pending) li.title = 'Sending…';
  else li.dataset.id = String(item.id);
  const date = new Date(Number.isFinite(item.ts) ? item.ts : Date.now());
  const time = el('time', 'time', `${pad(date.getHours())}:${pad(date.getMinutes())}`);
  time.dateTime = date.toISOString();
  li.append(el('span', 'user', item.user), time, el('div', 'text', item.text));
  item.el = li; // so a pending entry can later be replaced in place
  return li;
}

function renderMessages() {
  const room = state.rooms.get(state.current);
  ui.messages.replaceChildren(...(room?.items.map(itemEl) ?? []));
  renderOlder();
  ui.roomTitle.textContent = !room ? 'No room: join one'
    : room.dm ? `Direct messages with ${room.dm}` : `# ${state.current}`;
  ui.input.placeholder = !room ? 'Join a room to chat' : room.dm ? `Message ${room.dm}` : `Message #${state.current}`;
  renderCompose();
  scrollToEnd();
}

/** The composer: disabled, with a note saying why, in a room we may only read. */
function renderCompose() {
  const readOnly = Boolean(state.rooms.get(state.current)?.readOnly);
  ui.input.disabled = readOnly;
  ui.sendButton.disabled = readOnly;
  ui.composeHint.hidden = readOnly;
  ui.composeNote.hidden = !readOnly;
  ui.composeNote.textContent = readOnly ? `You may read #${state.current} but not write in it.` : '';
}

/** Shows "load older messages" while the current room may have older messages to load. */
// aria-disabled rather than disabled while busy or offline, so the button keeps keyboard focus.
function renderOlder() {
  const room = state.rooms.get(state.current);
  const hide = olderBefore(room) === null;
  // Hiding the focused button would drop focus to <body>: keep it on the message list.
  if (hide && document.activeElement === ui.loadOlder) ui.messages.focus();
  ui.loadOlder.hidden = hide;
  ui.loadOlder.setAttribute('aria-disabled', String(Boolean(room?.loading) || !conn.ready));
  ui.loadOlder.textContent = room?.loading ? 'Loading older messages…' : 'Load older messages';
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
  state.stuck = true;
  ui.newMessages.hidden = true;
}

// ---- Members ----

/** Asks for `name`'s member list from its first page, unless it is being fetched already. */
function fetchMembers(name) {
  const room = state.rooms.get(name);
  if (!room?.joined || room.fetch || !conn.ready) return;
  room.fetch = { members: new Map(), events: [], dropped: false, timer: 0 };
  requestMembers(name, null);
  if (name === state.current) renderMembers();
}

function requestMembers(name, cursor) {
  const room = state.rooms.get(name);
  conn.send({ type: 'presence', room: name, limit: MEMBERS_PAGE, ...(cursor ? { cursor } : {}) });
  // An `error` to a `presence` request carries no ref, so a refused page shows as no answer.
  room.fetch.timer = setTimeout(() => {
    room.fetch = null;
    scheduleRecheck(name, room);
    if (name === state.current) renderMembers();
  }, PRESENCE_TIMEOUT_MS);
}

function memberEvent(f) {
  const room = state.rooms.get(f.room);
  if (!room) return;
  if (Number.isInteger(f.online)) room.online = f.online;
  const event = { left: f.type === 'member_left',
    members: (Array.isArray(f.members) ? f.members : []).filter((m) => typeof m?.user === 'string') };
  applyMembers(room, event);
  room.fetch?.events.push(event); // replayed on the list being paged in
  membersChanged(f.room);
}

// Idempotent: an arrival of a listed user or a departure of an unlisted one changes nothing.
function applyMembers(room, { left, members }) {
  const list = room.members;
  if (!list) return; // never fetched: only the count is known
  for (const { user, since } of members) {
    if (left) list.delete(user);
    else if (list.has(user)) continue;
    else if (list.size < MAX_MEMBERS) list.set(user, since);
    else room.truncated = true;
  }
}

function membersChanged(name) {
  const room = state.rooms.get(name);
  if (membersAgree(room)) {
    clearTimeout(room.recheck);
    Object.assign(room, { recheck: 0, recheckMs: RECHECK_START_MS });
  } else if (room.fresh && !room.fetch) {
    scheduleRecheck(name, room);
  }
  renderRooms();
  if (name === state.current) renderMembers();
}

/** Whether the list matches the count (it is allowed to be short when truncated). */
const membersAgree = (room) => room.members !== null && room.online !== null
  && (room.truncated ? room.members.size <= room.online : room.members.size === room.online);

// The list and the count can disagree for a moment (a `member_joined` and a `member_left`
// gathered in the same interval come as two frames) or for good (a user who came and went
// within one interval is never announced, but may be on a page): look again a little later and
// fetch the list again if they still disagree, backing off while they keep disagreeing.
function scheduleRecheck(name, room) {
  if (room.recheck) return;
  room.recheck = setTimeout(() => {
    room.recheck = 0;
    if (state.rooms.get(name) !== room || (room.fresh && membersAgree(room))) return;
    room.recheckMs = Math.min(RECHECK_CAP_MS, room.recheckMs * 2);
    room.fresh = false;
    if (name === state.current) fetchMembers(name); // else when it is switched to
  }, room.recheckMs);
}

function stopMembers(room) {
  clearTimeout(room.fetch?.timer);
  clearTimeout(room.recheck);
  Object.assign(room, { fetch: null, recheck: 0, recheckMs: RECHECK_START_MS });
}

const collator = new Intl.Collator(undefined, { sensitivity: 'base', numeric: true });

/** The current room's members and count, updated in place, keyed by user. */
function renderMembers() {
  const room = state.rooms.get(state.current);
  const count = room?.online ?? null;
  ui.memberCount.textContent = count === null ? '' : `${count} online`;
  ui.membersToggleCount.textContent = count === null ? '' : String(count);
  ui.membersToggle.title = count === null ? 'Members' : `Members: ${count} online`;
  const list = room?.members ?? null;
  const note = !room ? 'Join a room to see who is in it.'
    : !conn.ready ? (list ? 'May be out of date until reconnected.' : 'Shown once connected.')
      : !list ? 'Loading members…' : '';
  ui.membersNote.textContent = note;
  ui.membersNote.hidden = !note;
  ui.membersPanel.setAttribute('aria-busy', String(Boolean(room?.fetch)));

  // Our own user first, then everyone by name.
  const users = [...(list?.keys() ?? [])].sort((a, b) =>
    (b === state.name) - (a === state.name) || collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0));
  const existing = new Map([...ui.members.children].map((li) => [li.dataset.user, li]));
  users.forEach((user, index) => {
    const li = existing.get(user) ?? memberEl(user, list.get(user));
    existing.delete(user);
    if (ui.members.children[index] !== li) ui.members.insertBefore(li, ui.members.children[index] ?? null);
  });
  for (const li of existing.values()) li.remove();

  const more = list && room.truncated ? Math.max(0, room.online - list.size) : 0;
  ui.membersMore.hidden = more === 0;
  ui.membersMore.textContent = more ? `and ${more} more` : '';
}

function memberEl(user, since) {
  const li = el('li', 'member');
  li.dataset.user = user;
  if (user === state.name) li.append(el('span', 'member-name', user));
  else {
    // Anyone else's name opens the direct-message room with them.
    const open = el('button', 'member-name', user);
    open.type = 'button';
    open.title = `Message ${user}`;
    open.setAttribute('aria-label', `Message ${user}`);
    li.append(open);
  }
  if (user === state.name) {
    li.classList.add('own');
    li.append(el('span', 'member-you', '(you)'));
  }
  if (Number.isFinite(since)) {
    const date = new Date(since);
    li.title = `Here since ${pad(date.getHours())}:${pad(date.getMinutes())}`;
  }
  return li;
}

// Beside the messages on wide screens (shown unless closed), a drawer over them on narrow ones
// (closed unless opened): the same panel, the same button.
const narrow = matchMedia('(max-width: 900px)');

function setMembersOpen(open) {
  const wasFocused = ui.membersPanel.contains(document.activeElement);
  state.membersOpen = open;
  ui.membersPanel.hidden = !open;
  ui.membersToggle.setAttribute('aria-expanded', String(open));
  if (open && narrow.matches) ui.membersClose.focus(); // into the drawer, which covers the rest
  else if (!open && wasFocused) ui.membersToggle.focus();
}

// ---- Rooms, status, errors ----

// Updates the lists in place, keyed by room, so a focused room keeps focus as counts change.
// Direct-message rooms have a list of their own, labelled by the other user.
function renderRooms() {
  const existing = new Map([...ui.rooms.children, ...ui.directs.children].map((li) => [li.dataset.room, li]));
  const index = new Map([[ui.rooms, 0], [ui.directs, 0]]);
  let unreadTotal = 0;
  for (const [name, room] of state.rooms) {
    const li = existing.get(name) ?? roomEl(name, room.dm);
    existing.delete(name);
    const list = room.dm ? ui.directs : ui.rooms;
    const online = li.querySelector('.online');
    online.hidden = room.online === null; // unknown until the server's `joined`
    online.textContent = online.hidden ? '' : String(room.online);
    online.title = online.hidden ? '' : `${room.online} online`;
    const unread = li.querySelector('.unread');
    unread.textContent = String(room.unread);
    unread.hidden = room.unread === 0;
    if (name === state.current) li.setAttribute('aria-current', 'true');
    else li.removeAttribute('aria-current');
    const at = index.get(list);
    if (list.children[at] !== li) list.insertBefore(li, list.children[at] ?? null);
    index.set(list, at + 1);
    unreadTotal += room.unread;
  }
  for (const li of existing.values()) li.remove();
  ui.directsTitle.hidden = ui.directs.hidden = ui.directs.children.length === 0;
  document.title = unreadTotal ? `(${unreadTotal}) scalechat` : 'scalechat';
}

function roomEl(name, dm) {
  const li = el('li', dm ? 'room direct' : 'room');
  li.dataset.room = name;
  if (dm) li.dataset.dm = dm;
  li.tabIndex = 0;
  const leave = el('button', 'leave', '×');
  leave.type = 'button';
  leave.title = dm ? `Close the conversation with ${dm}` : `Leave ${name}`;
  leave.setAttribute('aria-label', leave.title);
  li.append(el('span', 'room-name', dm ?? name), el('span', 'online'), el('span', 'unread'), leave);
  return li;
}

function renderStatus() {
  const s = !navigator.onLine ? 'offline' : conn.ready ? 'connected' : 'reconnecting';
  state.conn = s;
  ui.status.dataset.state = s;
  ui.status.textContent = s === 'connected' ? 'Connected'
    : s === 'offline' ? 'Offline' : conn.everReady ? 'Reconnecting…' : 'Connecting…';
}

// Takes a sentence or an `error` frame; returns false so callers can `return showError(…)`.
function showError(error) {
  ui.error.textContent = typeof error === 'string' ? error
    : ERROR_TEXT[error.code] ?? error.message ?? 'Something went wrong.';
  return false;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const pad = (n) => String(n).padStart(2, '0');

function nameProblem(name) {
  const chars = [...name].length; // code points, as the server counts
  if (chars === 0 || !name.trim()) return 'Enter a display name.';
  if (chars > MAX_NAME_CHARS) return `Names are at most ${MAX_NAME_CHARS} characters.`;
  if (/\p{Cc}/u.test(name)) return 'Names cannot contain control characters.';
  return null;
}

// ---- Events ----

// The search on screen: { room, query, cursor, pending, found, problem }, or null.
function searchRoom(query) {
  if (!state.current || !conn.ready) return showError('Connect and join a room to search it.');
  state.search = { room: state.current, query, cursor: null, pending: true, found: 0, problem: null };
  ui.searchList.replaceChildren();
  conn.send({ type: 'search', room: state.current, query, limit: SEARCH_PAGE });
  renderSearch();
  return true;
}

function searchMore() {
  const search = state.search;
  if (!search?.cursor || search.pending || !conn.ready) return;
  search.pending = true;
  conn.send({ type: 'search', room: search.room, query: search.query, cursor: search.cursor, limit: SEARCH_PAGE });
  renderSearch();
}

function closeSearch() {
  state.search = null;
  ui.searchList.replaceChildren();
  renderSearch();
}

function renderSearch() {
  const search = state.search;
  ui.searchResults.hidden = !search;
  if (!search) return;
  ui.searchSummary.textContent = search.problem ?? (search.pending ? 'Searching…'
    : search.found === 0 ? `No messages in #${search.room} match “${search.query}”.`
      : `${search.found} message${search.found === 1 ? '' : 's'} in #${search.room} match “${search.query}”, newest first.`);
  ui.searchMore.hidden = !search.cursor || search.pending;
}

function bindEvents() {
  ui.login.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = ui.nameInput.value.trim();
    const problem = nameProblem(name);
    ui.loginError.textContent = problem ?? '';
    ui.nameInput.setAttribute('aria-invalid', String(Boolean(problem)));
    if (!problem) start(name);
  });

  ui.sendForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim()) return;
    ui.error.textContent = '';
    if (sendMessage(text)) ui.input.value = '';
  });

  ui.input.addEventListener('keydown', (event) => {
    // While composing (IME: Japanese, Chinese…) Enter confirms the text; it must not send.
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.sendForm.requestSubmit();
    }
  });

  ui.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = ui.joinInput.value.trim();
    ui.joinInput.setAttribute('aria-invalid', String(!ROOM_RE.test(name)));
    if (!ROOM_RE.test(name)) return showError({ code: 'bad_room' });
    ui.joinInput.value = '';
    ui.error.textContent = '';
    if (state.rooms.has(name)) return switchRoom(name);
    if (conn.ready) return requestJoin(name); // shown and switched to on `joined`
    addRoom(name); // offline: it is joined on reconnect
    switchRoom(name);
  });

  for (const list of [ui.rooms, ui.directs]) {
    list.addEventListener('click', (event) => {
      const li = event.target.closest('li[data-room]');
      if (!li) return;
      if (!event.target.closest('button.leave')) return switchRoom(li.dataset.room);
      // Removing the focused room would drop focus to <body>: move it to a neighbour.
      const next = li.nextElementSibling ?? li.previousElementSibling ?? ui.joinInput;
      leaveRoom(li.dataset.room);
      next.focus();
    });
    list.addEventListener('keydown', (event) => {
      if (!event.target.matches('li[data-room]') || (event.key !== 'Enter' && event.key !== ' ')) return;
      event.preventDefault();
      switchRoom(event.target.dataset.room);
    });
  }

  ui.members.addEventListener('click', (event) => {
    const li = event.target.closest('button.member-name')?.closest('li[data-user]');
    if (!li) return;
    if (narrow.matches) setMembersOpen(false); // the drawer covers the conversation it opens
    openDirect(li.dataset.user);
  });

  ui.messages.addEventListener('scroll', () => {
    const m = ui.messages;
    state.stuck = m.scrollHeight - m.scrollTop - m.clientHeight < 48;
    if (state.stuck) ui.newMessages.hidden = true;
    // Scrolled up to the oldest message shown: fetch the ones before it.
    if (m.scrollTop <= 0 && m.scrollHeight > m.clientHeight && !ui.loadOlder.hidden) loadOlder();
  });
  ui.loadOlder.addEventListener('click', loadOlder);
  ui.searchForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const query = ui.searchInput.value.trim();
    if (query) searchRoom(query);
    else closeSearch();
  });
  ui.searchMore.addEventListener('click', searchMore);
  ui.searchClose.addEventListener('click', () => { closeSearch(); ui.searchInput.value = ''; });
  // The list shrinks when a phone keyboard opens: stay on the newest message if we were there.
  new ResizeObserver(() => { if (state.stuck) scrollToEnd(); }).observe(ui.messages);
  ui.newMessages.addEventListener('click', () => { scrollToEnd(); ui.input.focus(); });

  ui.membersToggle.addEventListener('click', () => setMembersOpen(!state.membersOpen));
  ui.membersClose.addEventListener('click', () => setMembersOpen(false));
  narrow.addEventListener('change', () => setMembersOpen(!narrow.matches));
  // The drawer closes like other overlays: Escape, or a click or tap outside it.
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && narrow.matches && state.membersOpen) setMembersOpen(false);
  });
  document.addEventListener('click', (event) => {
    if (!narrow.matches || !state.membersOpen || !event.target.isConnected) return;
    if (!ui.membersPanel.contains(event.target) && !ui.membersToggle.contains(event.target)) setMembersOpen(false);
  });

  window.addEventListener('online', () => { renderStatus(); conn.kick(); });
  window.addEventListener('offline', renderStatus);
}

// ---- Start ----

function start(name) {
  state.name = name;
  store.set('scalechat.name', name);
  for (const { room, dm } of savedDirects(name)) if (!state.rooms.has(room)) state.rooms.set(room, newRoom(dm));
  state.current ??= firstRoom() ?? null;
  ui.login.hidden = true;
  ui.chat.hidden = false;
  ui.status.hidden = false;
  ui.me.hidden = false;
  ui.me.textContent = `You are ${name}`;
  renderRooms();
  renderMessages();
  renderMembers();
  setMembersOpen(!narrow.matches);
  conn.start();
  ui.input.focus();
}

let saved = null;
try { saved = JSON.parse(store.get('scalechat.rooms')); } catch { /* a bad value: start over */ }
// No remembered list: chat in `general` right away. An empty list means the user left all rooms.
for (const name of Array.isArray(saved) ? saved : ['general']) {
  if (typeof name === 'string' && ROOM_RE.test(name) && !DIRECT_RE.test(name) && !state.rooms.has(name)) {
    state.rooms.set(name, newRoom());
  }
}
state.current = firstRoom() ?? null;

bindEvents();
renderStatus();
window.scalechat = Object.freeze({ get state() { return state.conn; } });

const preset = new URLSearchParams(location.search).get('name')?.trim();
const remembered = store.get('scalechat.name');
if (preset && !nameProblem(preset)) start(preset);
else if (remembered && !nameProblem(remembered)) start(remembered);
else {
  ui.login.hidden = false;
  ui.status.hidden = true; // nothing connects until there is a name
  ui.nameInput.value = preset ?? '';
  ui.nameInput.focus();
}
