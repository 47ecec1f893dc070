// Log panes: bounded, ANSI colours, follow mode; and a model's own log stream.

import { html, useEffect, useLayoutEffect, useMemo, useRef, useState } from "../lib.js";
import { request, encodeModel } from "../api.js";
import { ansi } from "./ansi.js";

export const MAX_LINES = 2000; // lines shown in one pane
const MAX_CHARS = 256 * 1024; // kept of a model's stream

function lastLines(text, n) {
  let end = text.length;
  let i = end;
  let count = 0;
  while (i > 0) {
    i = text.lastIndexOf("\n", i - 1);
    if (i < 0) break;
    count += 1;
    if (count > n) return text.slice(i + 1, end);
  }
  return text;
}

/** One pane of log text; follows the end while ``follow`` and the reader is at the bottom. */
export function LogView({ text, follow = true, label, short = false, id }) {
  const pre = useRef(null);
  const shown = useMemo(() => ansi(lastLines(text || "", MAX_LINES)), [text]);
  useLayoutEffect(() => {
    if (follow && pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [shown, follow]);
  return html`<pre class=${"log" + (short ? " short" : "")} ref=${pre} id=${id} tabindex="0"
                   aria-label=${label} aria-live="off">${shown.length ? shown : html`<span class="muted">(nothing yet)</span>`}</pre>`;
}

/** A model's log (``/logs/stream/<id>``, history first), live while mounted. */
export function useModelLog(model) {
  const [state, setState] = useState({ text: "", error: null, live: false });
  const [round, setRound] = useState(0); // a new stream after the page comes back from the bfcache
  useEffect(() => {
    const back = (event) => { if (event.persisted) setRound((n) => n + 1); };
    window.addEventListener("pageshow", back);
    return () => window.removeEventListener("pageshow", back);
  }, []);
  useEffect(() => {
    if (!model) return undefined;
    const controller = new AbortController();
    const leave = () => controller.abort(); // see events.js: no connection kept by a left page
    window.addEventListener("pagehide", leave);
    let text = "";
    setState({ text: "", error: null, live: false });
    (async () => {
      try {
        const response = await request(`/logs/stream/${encodeModel(model)}`, { signal: controller.signal });
        setState({ text, error: null, live: true });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        controller.signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          text += value;
          if (text.length > MAX_CHARS) text = text.slice(text.indexOf("\n", text.length - MAX_CHARS) + 1);
          setState({ text, error: null, live: true });
        }
        setState({ text, error: null, live: false });
      } catch (e) {
        if (e.name !== "AbortError") setState({ text, error: e, live: false });
      }
    })();
    return () => { window.removeEventListener("pagehide", leave); controller.abort(); };
  }, [model, round]);
  return state;
}
