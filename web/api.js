// The UI's HTTP client: llama-swap's API, errors turned into readable messages.
//
// The API key (when the server has keys) is kept by the browser after the
// sign-in page and sent with every request, so nothing here handles it.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }

  get forbidden() { return this.status === 403; }
  get notFound() { return this.status === 404; }
}

/** The readable message of an error body: llama-swap's JSON envelope, or its text. */
export function errorMessage(status, text) {
  try {
    const doc = JSON.parse(text);
    const e = doc.error;
    if (typeof e === "string") return e;
    if (e && e.message) return e.message;
    if (doc.message) return doc.message;
    if (doc.detail) return typeof doc.detail === "string" ? doc.detail : JSON.stringify(doc.detail);
  } catch (err) { /* not JSON */ }
  const trimmed = (text || "").replace(/^llama-swap: /, "").trim();
  return trimmed ? `${status}: ${trimmed.slice(0, 300)}` : `the server answered ${status}`;
}

/** fetch() that throws ApiError for an answer that is not 2xx. */
export async function request(path, options = {}) {
  const init = { credentials: "same-origin", cache: "no-store", ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers = { "Content-Type": "application/json", ...(options.headers || {}) };
    delete init.json;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the server could not be reached");
  }
  if (!response.ok) {
    const text = await response.text().catch(() => "");
    throw new ApiError(response.status, errorMessage(response.status, text), text);
  }
  return response;
}

export async function getJSON(path, options) {
  const response = await request(path, options);
  return response.json();
}

export async function postJSON(path, body, options = {}) {
  const response = await request(path, { method: "POST", json: body, ...options });
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// -- llama-swap's routes the UI uses ------------------------------------------------------------

export const api = {
  models: () => getJSON("/v1/models"),
  running: () => getJSON("/running"),
  load: (id) => request(`/upstream/${encodeModel(id)}/`),
  unload: (id) => request(`/api/models/unload/${encodeModel(id)}`, { method: "POST" }),
  unloadAll: () => request("/api/models/unload", { method: "POST" }),
  profiles: () => getJSON("/api/profiles"),
  setProfile: (name) => request("/api/profiles/active", { method: "PUT", json: { name } }).then((r) => r.json()),
  activity: (query) => getJSON(`/api/metrics/activity?${query}`),
  stats: (model) => getJSON("/api/metrics/stats" + (model ? `?model=${encodeURIComponent(model)}` : "")),
  capture: (id) => getJSON(`/api/captures/${id}`),
  captures: () => getJSON("/api/captures"),
  cancel: (id) => request(`/api/inflight/${encodeURIComponent(id)}/cancel`, { method: "POST" }),
  performance: (after) => getJSON("/api/performance" + (after ? `?after=${encodeURIComponent(after)}` : "")),
  hardware: () => getJSON("/api/hardware"),
  version: () => getJSON("/api/version"),
};

/** A model id in a path: each segment encoded, slashes kept (ids such as "peer/model"). */
export function encodeModel(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

// -- server-sent events over fetch (so status codes are seen and any header may be sent) ---------

/**
 * Read an SSE response body, calling onEvent({event, data}) per event; resolves when it ends.
 */
export async function readSSE(response, onEvent, signal) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const abort = () => reader.cancel().catch(() => {});
  if (signal) signal.addEventListener("abort", abort, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseFrame(frame);
        if (parsed) onEvent(parsed);
      }
    }
    if (buffer.trim()) {
      const parsed = parseFrame(buffer);
      if (parsed) onEvent(parsed);
    }
  } finally {
    if (signal) signal.removeEventListener("abort", abort);
  }
}

function parseFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, data: data.join("\n") };
}
