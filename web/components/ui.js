// Small shared components: state badges, dialogs, tabs, copy buttons.

import { html, useEffect, useRef, useState, copyText } from "../lib.js";

export function StateBadge({ state }) {
  const s = state || "unknown";
  return html`<span class=${"badge state-" + s} data-state=${s}>${s}</span>`;
}

/** A modal dialog: Escape or the close button closes it; focus moves into it. */
export function Dialog({ title, onClose, children, actions, label }) {
  const box = useRef(null);
  useEffect(() => {
    const before = document.activeElement;
    const onKey = (e) => { if (e.key === "Escape") onClose(); };
    document.addEventListener("keydown", onKey);
    box.current?.querySelector("button.close")?.focus();
    return () => {
      document.removeEventListener("keydown", onKey);
      if (before && before.focus) before.focus();
    };
  }, []);
  const onOverlay = (e) => { if (e.target === e.currentTarget) onClose(); };
  return html`
    <div class="overlay" onClick=${onOverlay}>
      <div class="dialog" role="dialog" aria-modal="true" aria-label=${label || title} ref=${box}>
        <header><h2>${title}</h2>${actions}<button class="close small" onClick=${onClose} aria-label="Close">Close</button></header>
        <div class="body">${children}</div>
      </div>
    </div>`;
}

/** Tabs: ``tabs`` is [[id, label], ...]; ``value``/``onChange`` the selected id. */
export function Tabs({ tabs, value, onChange, label }) {
  return html`
    <div class="tabs" role="tablist" aria-label=${label || "Views"}>
      ${tabs.map(([id, text]) => html`
        <button role="tab" aria-selected=${value === id ? "true" : "false"} data-tab=${id}
                onClick=${() => onChange(id)}>${text}</button>`)}
    </div>`;
}

export function CopyButton({ text, label = "Copy", className = "small" }) {
  const [done, setDone] = useState(null);
  const onClick = async () => {
    const ok = await copyText(typeof text === "function" ? text() : text);
    setDone(ok ? "Copied" : "Copy failed");
    setTimeout(() => setDone(null), 1500);
  };
  return html`<button class=${className} onClick=${onClick}>${done || label}</button>`;
}

/** Loads ``load()`` once (and again when ``deps`` change): {data, error, loading, reload}. */
export function useLoad(load, deps = []) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [n, setN] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true }));
    load().then(
      (data) => { if (live) setState({ data, error: null, loading: false }); },
      (error) => { if (live) setState({ data: null, error, loading: false }); },
    );
    return () => { live = false; };
  }, [...deps, n]);
  return { ...state, reload: () => setN((x) => x + 1) };
}

export function ErrorNote({ error }) {
  if (!error) return null;
  const text = error.forbidden ? "This needs an admin API key." : error.message || String(error);
  return html`<p class="error" role="alert">${text}</p>`;
}
