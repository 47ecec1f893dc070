// The one live connection: /api/events, read into a small store that pages subscribe to.
//
// Reconnects with backoff after a drop (0.5 s doubling to 10 s, at once when
// the tab comes back or the network returns); each (re)connection starts
// with the server's snapshot (log histories, model states, in-flight
// requests), which replaces what the store held.

import { useEffect, useReducer, useRef } from "./lib.js";
import { request, readSSE, ApiError } from "./api.js";

const MAX_LOG_CHARS = 256 * 1024; // per source, kept in the page
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];

export const store = {
  connection: "connecting", // connecting | connected | disconnected | unauthorized
  connectedSince: null,
  reconnects: 0,
  received: 0,
  lastEventAt: null,
  retryAt: null,
  models: null, // modelStatus (admin keys only), null until it came
  logs: { proxy: "", upstream: "" },
  inflight: {}, // id -> in-flight request
  uiConfig: { activity: { session_id: [] } },
  profile: { active: null },
  activity: { seq: 0, last: null }, // bumped on each new activity row
  access: { admin: null, performance: null, profiles: null }, // what this key may see (probed)
};

const listeners = new Set();

function set(patch) {
  Object.assign(store, patch);
  for (const fn of listeners) fn();
}

/** Change the store from a page (e.g. the active profile after switching it). */
export const update = set;

export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Re-render when ``select(store)`` changes (compared with Object.is). */
export function useStore(select = (s) => s) {
  const [, force] = useReducer((n) => n + 1, 0);
  const selected = useRef();
  selected.current = select(store);
  useEffect(() => subscribe(() => {
    if (!Object.is(select(store), selected.current)) force();
  }), []);
  return selected.current;
}

// -- events -------------------------------------------------------------------------------------

function appendLog(source, text, replace) {
  let next = replace ? text : store.logs[source] + text;
  if (next.length > MAX_LOG_CHARS) {
    const cut = next.indexOf("\n", next.length - MAX_LOG_CHARS);
    next = next.slice(cut >= 0 ? cut + 1 : next.length - MAX_LOG_CHARS);
  }
  set({ logs: { ...store.logs, [source]: next } });
}

function onInflight(data) {
  if (data.operation === "snapshot") {
    const all = {};
    for (const r of data.requests || []) all[r.id] = { ...r, seenAt: Date.now() };
    set({ inflight: all });
  } else if (data.operation === "upsert") {
    set({ inflight: { ...store.inflight, [data.request.id]: { ...data.request, seenAt: Date.now() } } });
  } else if (data.operation === "remove") {
    const next = { ...store.inflight };
    delete next[data.id];
    set({ inflight: next });
  }
}

function dispatch(envelope, fresh) {
  let data;
  try {
    data = JSON.parse(envelope.data);
  } catch (e) {
    return;
  }
  switch (envelope.type) {
    case "logData":
      appendLog(data.source, data.data, !fresh.has(data.source));
      fresh.add(data.source);
      break;
    case "modelStatus":
      set({ models: data });
      break;
    case "inflight":
      onInflight(data);
      break;
    case "activity":
      set({ activity: { seq: store.activity.seq + 1, last: data } });
      break;
    case "uiConfig":
      set({ uiConfig: data });
      break;
    case "profileChanged":
      set({ profile: { active: data ? data.active : null } });
      break;
    default:
      break;
  }
}

// -- the connection --------------------------------------------------------------------------------

let attempt = 0;
let retryTimer = null;
let running = null;

async function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (running) return;
  const controller = new AbortController();
  running = controller;
  set({ connection: "connecting", retryAt: null });
  let ended = "disconnected";
  try {
    const response = await request("/api/events", { signal: controller.signal, headers: { Accept: "text/event-stream" } });
    attempt = 0;
    set({ connection: "connected", connectedSince: Date.now() });
    probeAccess();
    const fresh = new Set();
    await readSSE(response, (ev) => {
      store.received += 1;
      store.lastEventAt = Date.now();
      let envelope;
      try { envelope = JSON.parse(ev.data); } catch (e) { return; }
      dispatch(envelope, fresh);
    }, controller.signal);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) ended = "unauthorized";
  } finally {
    running = null;
  }
  if (controller.signal.aborted) return; // the page was left (pagehide): no retry until it is back
  const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
  attempt += 1;
  set({ connection: ended, connectedSince: null, reconnects: store.reconnects + 1, retryAt: Date.now() + delay });
  retryTimer = setTimeout(connect, delay);
}

function reconnectNow() {
  if (!running && retryTimer) connect();
}

/** Probe what this key may see: admin-only routes answer 403 to other keys. */
export async function probeAccess() {
  const access = { ...store.access };
  try {
    await request("/api/captures");
    access.admin = true;
  } catch (e) {
    access.admin = e.status === 403 ? false : access.admin ?? true;
  }
  try {
    await request(`/api/performance?after=${encodeURIComponent(new Date().toISOString())}`);
    access.performance = true;
  } catch (e) {
    access.performance = false;
  }
  try {
    const response = await request("/api/profiles");
    access.profiles = await response.json();
    if (access.profiles && "active" in access.profiles) set({ profile: { active: access.profiles.active } });
  } catch (e) {
    access.profiles = null; // not offered by this server (or this key)
  }
  set({ access });
}

export function start() {
  connect();
  document.addEventListener("visibilitychange", () => { if (!document.hidden) reconnectNow(); });
  window.addEventListener("online", reconnectNow);
  // A page left for another is kept frozen in the back/forward cache with its connections:
  // close the stream (browsers allow six connections to a server), open it again on return.
  window.addEventListener("pagehide", () => {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (running) running.abort();
  });
  window.addEventListener("pageshow", (event) => { if (event.persisted) { attempt = 0; connect(); } });
}
