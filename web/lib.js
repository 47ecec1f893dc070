// Shared basics: htm bound to Preact, the router, storage and formatting helpers.

import { h, render, Fragment } from "preact";
import { useEffect, useState } from "preact/hooks";
import htm from "htm";

export { h, render, Fragment };
export * from "preact/hooks";
export const html = htm.bind(h);

// -- routing: history API under /ui/ -------------------------------------------------------

export const ROOT = "/ui";
const routeListeners = new Set();

/** The path inside the UI ("/models/A" for /ui/models/A). */
export function currentPath() {
  const path = location.pathname.startsWith(ROOT) ? location.pathname.slice(ROOT.length) : location.pathname;
  return path === "" ? "/" : path;
}

export function navigate(path, replace = false) {
  const url = ROOT + path;
  if (url !== location.pathname + location.search) {
    history[replace ? "replaceState" : "pushState"](null, "", url);
  }
  for (const fn of routeListeners) fn();
  window.scrollTo(0, 0);
}

window.addEventListener("popstate", () => { for (const fn of routeListeners) fn(); });

export function useRoute() {
  const [path, setPath] = useState(currentPath());
  useEffect(() => {
    const fn = () => setPath(currentPath());
    routeListeners.add(fn);
    return () => routeListeners.delete(fn);
  }, []);
  return path;
}

/** An in-app link: a real <a href> (open in a new tab works), navigated without a reload. */
export function Link({ to, children, ...rest }) {
  const onClick = (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    navigate(to);
  };
  return html`<a href=${ROOT + to} onClick=${onClick} ...${rest}>${children}</a>`;
}

export const modelPath = (id) => "/models/" + id.split("/").map(encodeURIComponent).join("/");

// -- storage (localStorage may be off: then settings last for the page) ----------------------

const memory = new Map();

export function load(key, fallback) {
  try {
    const raw = localStorage.getItem("llamaswap." + key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (e) {
    return memory.has(key) ? memory.get(key) : fallback;
  }
}

export function save(key, value) {
  memory.set(key, value);
  try { localStorage.setItem("llamaswap." + key, JSON.stringify(value)); } catch (e) { /* kept in memory */ }
}

/** useState that is kept in localStorage under ``key``. */
export function useStored(key, fallback) {
  const [value, setValue] = useState(() => load(key, fallback));
  const set = (next) => {
    setValue((old) => {
      const v = typeof next === "function" ? next(old) : next;
      save(key, v);
      return v;
    });
  };
  return [value, set];
}

// -- formatting -------------------------------------------------------------------------------

const nf = new Intl.NumberFormat();
export const num = (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : nf.format(n));
export const tokens = (n) => (n === null || n === undefined || n < 0 ? "–" : nf.format(n));
export const speed = (n) => (n === null || n === undefined || n <= 0 ? "–" : `${n.toFixed(n < 10 ? 2 : 1)} t/s`);

export function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  const s = Math.round((ms % 60000) / 1000);
  return `${m}m ${String(s).padStart(2, "0")}s`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function clock(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "–";
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (err) { ok = false; }
    area.remove();
    return ok;
  }
}

export function download(name, text, type = "text/markdown") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// -- toasts: one message at a time, bottom right ------------------------------------------------

const toastListeners = new Set();
export function toast(message, kind = "bad") {
  for (const fn of toastListeners) fn({ message, kind, at: Date.now() });
}

export function Toasts() {
  const [current, setCurrent] = useState(null);
  useEffect(() => {
    let timer = null;
    const fn = (t) => {
      setCurrent(t);
      clearTimeout(timer);
      timer = setTimeout(() => setCurrent(null), 6000);
    };
    toastListeners.add(fn);
    return () => { toastListeners.delete(fn); clearTimeout(timer); };
  }, []);
  if (!current) return null;
  return html`<div class=${"toast " + current.kind} role="status" onClick=${() => setCurrent(null)}>${current.message}</div>`;
}
