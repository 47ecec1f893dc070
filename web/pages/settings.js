// Settings: theme, capability tags, build info, the event stream's status.

import { html, useEffect, useState, useStored, clock } from "../lib.js";
import { useStore, store } from "../events.js";
import { api } from "../api.js";
import { useLoad, ErrorNote } from "../components/ui.js";

const media = matchMedia("(prefers-color-scheme: dark)");

/** Apply a theme choice ("auto" | "light" | "dark") to the page. */
export function applyTheme(choice) {
  const dark = choice === "dark" || (choice === "auto" && media.matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
}

export function useTheme() {
  const [theme, setTheme] = useStored("theme", "auto");
  useEffect(() => {
    applyTheme(theme);
    const follow = () => applyTheme(theme);
    media.addEventListener("change", follow);
    return () => media.removeEventListener("change", follow);
  }, [theme]);
  return [theme, setTheme];
}

function StreamStatus() {
  const connection = useStore((s) => s.connection);
  const since = useStore((s) => s.connectedSince);
  const reconnects = useStore((s) => s.reconnects);
  const retryAt = useStore((s) => s.retryAt);
  const [, tick] = useState(0);
  useEffect(() => {
    const timer = setInterval(() => tick((t) => t + 1), 1000);
    return () => clearInterval(timer);
  }, []);
  return html`<dl class="kv" id="stream-status">
    <dt>State</dt><dd data-connection=${connection}>${connection}</dd>
    ${since && html`<dt>Connected since</dt><dd>${clock(since)}</dd>`}
    ${connection !== "connected" && retryAt && html`<dt>Next try</dt><dd>in ${Math.max(0, Math.ceil((retryAt - Date.now()) / 1000))} s</dd>`}
    <dt>Reconnections</dt><dd>${reconnects}</dd>
    <dt>Events received</dt><dd>${store.received}</dd>
    <dt>Last event</dt><dd>${store.lastEventAt ? clock(store.lastEventAt) : "–"}</dd>
  </dl>`;
}

export function SettingsPage({ theme, setTheme }) {
  const [caps, setCaps] = useStored("models.showCaps", true);
  const admin = useStore((s) => s.access.admin);
  const { data: version, error } = useLoad(api.version);
  return html`
    <div class="page-head"><h1>Settings</h1></div>
    <div class="grid">
      <div class="card">
        <h2>Appearance</h2>
        <fieldset style="border:0;padding:0;margin:0">
          <legend class="sr-only">Theme</legend>
          ${[["auto", "Follow the system"], ["light", "Light"], ["dark", "Dark"]].map(([value, label]) => html`
            <label class="check" style="margin-right:1rem"><input type="radio" name="theme" value=${value}
              checked=${theme === value} onChange=${() => setTheme(value)} />${label}</label>`)}
        </fieldset>
        <p><label class="check"><input type="checkbox" name="show_caps" checked=${caps} onChange=${(e) => setCaps(e.target.checked)} />
          Show capability tags on the Models page</label></p>
      </div>
      <div class="card">
        <h2>Build</h2>
        <${ErrorNote} error=${error} />
        ${version && html`<dl class="kv" id="build-info">
          <dt>Version</dt><dd>${version.version}</dd>
          <dt>Commit</dt><dd class="mono">${version.commit}</dd>
          <dt>Build date</dt><dd>${version.build_date}</dd>
          ${version.python && html`<dt>Python</dt><dd>${version.python}</dd>`}
        </dl>`}
      </div>
      <div class="card">
        <h2>Event stream</h2>
        <${StreamStatus} />
      </div>
      <div class="card">
        <h2>Access</h2>
        <p id="access">${admin === false ? "This API key is not an admin key: unloading, logs, captures, the hardware page and cancelling requests are hidden."
          : "Full access (an admin API key, or a server without API keys)."}</p>
        <p class="muted small">With API keys, the browser keeps the key it was given until it is closed;
          to use another key, open the UI in a new private window.</p>
      </div>
    </div>`;
}
