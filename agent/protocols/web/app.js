// Live captions from the agent's /events WebSocket (schema: docs/events.md).
//
// URL parameters of the page: token (passed on to /events), agent (another agent's
// ws://HOST:PORT; default: the server of this page), stream (initial stream filter).
"use strict";

const MODEL_KINDS = new Set(["transcript", "caption", "answer", "command"]);
const MAX_ROWS = 500;
const METER_FLOOR_DBFS = -60;

const params = new URLSearchParams(location.search);
const els = {
  conn: document.getElementById("conn"),
  filter: document.getElementById("stream-filter"),
  partials: document.getElementById("show-partials"),
  listening: document.getElementById("listening"),
  level: document.getElementById("level"),
  events: document.getElementById("events"),
  empty: document.getElementById("empty"),
  statusLine: document.getElementById("status-line"),
};
const rows = new Map(); // event id -> <li>
const streams = new Set();
const listening = new Map(); // stream -> bool
const levels = new Map(); // stream -> last level_dbfs
let wanted = params.get("stream") || "";

function eventsUrl() {
  const base = params.get("agent") ||
    `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
  const url = new URL("/events", base.replace(/^http/, "ws"));
  const token = params.get("token");
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

function clock(unixSeconds) {
  if (!unixSeconds) return "";
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  return el;
}

function addStream(stream) {
  if (stream === "*" || streams.has(stream)) return;
  streams.add(stream);
  const option = document.createElement("option");
  option.value = stream;
  option.textContent = stream;
  els.filter.append(option);
  if (stream === wanted) els.filter.value = stream;
}

function visible(li) {
  const stream = els.filter.value;
  if (stream && li.dataset.stream !== stream) return false;
  return els.partials.checked || li.dataset.partial !== "true";
}

function textOf(event) {
  if (event.kind === "command" && event.intent) {
    const { intent, ...slots } = event.intent;
    const rest = Object.entries(slots).map(([k, v]) => `${k}=${v}`).join(" ");
    return rest ? `${intent} (${rest})` : intent;
  }
  return event.text;
}

function showModelEvent(event) {
  addStream(event.stream);
  let li = rows.get(event.id);
  if (!li) {
    li = document.createElement("li");
    li.dataset.id = event.id;
    li.dataset.stream = event.stream;
    li.dataset.kind = event.kind;
    li.className = `kind-${event.kind}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.append(
      span("span", `${event.start.toFixed(1)}–${event.end.toFixed(1)} s`),
      span("stream", event.stream),
      span("wall", ""),
    );
    const body = document.createElement("div");
    body.className = "body";
    if (event.question) body.append(span("question", `${event.question} → `));
    body.append(span("text", ""));
    li.append(meta, span("kind", event.kind), body);
    rows.set(event.id, li);
    els.events.prepend(li);
    while (els.events.children.length > MAX_ROWS) {
      const last = els.events.lastElementChild;
      rows.delete(last.dataset.id);
      last.remove();
    }
  }
  li.dataset.partial = String(Boolean(event.partial));
  li.dataset.seq = String(event.seq);
  li.querySelector(".text").textContent = textOf(event);
  li.querySelector(".wall").textContent = clock(event.timing && event.timing.emitted);
  li.hidden = !visible(li);
  els.empty.hidden = els.events.children.length > 0;
}

function renderIndicators() {
  const stream = els.filter.value;
  const on = stream ? Boolean(listening.get(stream))
    : [...listening.values()].some(Boolean);
  els.listening.dataset.on = String(on);
  const heard = stream ? [stream] : [...listening.keys()].filter((s) => listening.get(s));
  els.listening.querySelector(".label").textContent =
    on ? `listening${stream ? "" : ` (${heard.join(", ")})`}` : "idle";
}

function setLevel(stream, dbfs, decay) {
  levels.set(stream, dbfs);
  if (els.filter.value && els.filter.value !== stream) return;
  const share = dbfs === null || dbfs === undefined ? 0
    : Math.max(0, Math.min(1, 1 - dbfs / METER_FLOOR_DBFS));
  els.level.dataset.dbfs = dbfs === null || dbfs === undefined ? "" : String(dbfs);
  els.level.classList.remove("decay");
  els.level.style.width = `${(share * 100).toFixed(1)}%`;
  if (decay) {
    // After a segment ends, let the meter fall back to zero slowly.
    requestAnimationFrame(() => {
      els.level.classList.add("decay");
      els.level.style.width = "0%";
    });
  }
}

function showStatus(event) {
  const detail = event.detail || {};
  if (event.stream && event.stream !== "*") addStream(event.stream);
  if (event.status === "segment_started") {
    listening.set(event.stream, true);
    setLevel(event.stream, detail.level_dbfs, false);
    renderIndicators();
    return;
  }
  if (event.status === "segment_ended") {
    listening.set(event.stream, false);
    setLevel(event.stream, detail.level_dbfs, true);
    renderIndicators();
    return;
  }
  if (event.status === "stream_closed") {
    listening.set(event.stream, false);
    renderIndicators();
  }
  const where = event.stream && event.stream !== "*" ? `[${event.stream}] ` : "";
  els.statusLine.textContent = `${clock(event.timing && event.timing.emitted)} ${where}${event.status}: ${event.message}`;
  els.statusLine.dataset.status = event.status;
}

function refilter() {
  wanted = els.filter.value;
  for (const li of rows.values()) li.hidden = !visible(li);
  const stream = els.filter.value;
  if (stream) setLevel(stream, levels.get(stream), false);
  renderIndicators();
}

let retryMs = 500;

function connect() {
  const url = eventsUrl();
  els.conn.dataset.state = "connecting";
  els.conn.textContent = "connecting…";
  const ws = new WebSocket(url);
  ws.onopen = () => {
    retryMs = 500;
    els.conn.dataset.state = "open";
    els.conn.textContent = "connected";
  };
  ws.onmessage = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (MODEL_KINDS.has(event.kind)) showModelEvent(event);
    else if (event.kind === "status") showStatus(event);
  };
  ws.onclose = (close) => {
    els.conn.dataset.state = "closed";
    // A refused handshake (HTTP 401: missing or wrong token) also reaches the page as 1006.
    const why = close.code === 1006
      ? "agent unreachable or token refused"
      : `closed ${close.code} ${close.reason}`;
    els.conn.textContent = `${why}; retrying in ${(retryMs / 1000).toFixed(1)} s`;
    listening.clear();
    renderIndicators();
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

els.filter.addEventListener("change", refilter);
els.partials.addEventListener("change", refilter);
connect();
