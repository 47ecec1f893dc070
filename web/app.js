// The shell: navigation, the connection indicator (also in the tab's title), the profile
// switch, and the page for the current path.  Pages are in pages/, one module each.

import { html, render, useEffect, useRoute, Link, navigate, Toasts } from "./lib.js";
import { start, useStore, update } from "./events.js";
import { api } from "./api.js";
import { ModelsPage } from "./pages/models.js";
import { ModelPage } from "./pages/model.js";
import { ActivityPage } from "./pages/activity.js";
import { LogsPage } from "./pages/logs.js";
import { PerformancePage } from "./pages/performance.js";
import { HardwarePage } from "./pages/hardware.js";
import { PlaygroundPage } from "./pages/playground.js";
import { SettingsPage, useTheme } from "./pages/settings.js";

const PAGES = [
  ["/models", "Models"],
  ["/activity", "Activity"],
  ["/logs", "Logs"],
  ["/performance", "Performance"],
  ["/hardware", "Hardware"],
  ["/playground", "Playground"],
  ["/settings", "Settings"],
];
const INDICATOR = { connected: "🟢", connecting: "🟡", disconnected: "🔴", unauthorized: "🔴" };
const CONNECTION_TEXT = { connected: "live", connecting: "connecting…", disconnected: "disconnected", unauthorized: "key refused" };

function route(path) {
  const parts = path.split("/").filter(Boolean);
  if (!parts.length) return { name: "/models", title: "Models" };
  if (parts[0] === "models" && parts.length > 1) {
    const id = parts.slice(1).map(decodeURIComponent).join("/");
    return { name: "/models", title: id, id };
  }
  const page = PAGES.find(([p]) => p === "/" + parts[0]);
  return page ? { name: page[0], title: page[1] } : { name: "unknown", title: "Not found" };
}

function ProfileSwitch() {
  const profiles = useStore((s) => s.access.profiles);
  const active = useStore((s) => s.profile.active);
  if (!profiles || !Array.isArray(profiles.profiles) || !profiles.profiles.length) return null;
  const choose = async (name) => {
    try {
      const doc = await api.setProfile(name || null);
      update({ profile: { active: doc.active ?? null } });
    } catch (e) {
      /* the Models page shows why; the select snaps back */
      update({ profile: { active } });
    }
  };
  return html`<label class="check small" title="Active profile">
    <span class="sr-only">Profile</span>
    <select value=${active || ""} onChange=${(e) => choose(e.target.value)} name="header_profile" aria-label="Active profile">
      <option value="">no profile</option>
      ${profiles.profiles.map((p) => html`<option value=${p.id}>${p.id}</option>`)}
    </select></label>`;
}

function Indicator() {
  const connection = useStore((s) => s.connection);
  return html`<${Link} to="/settings" class="conn" id="connection" data-connection=${connection}
      title=${`Event stream: ${CONNECTION_TEXT[connection]}`} style="text-decoration:none">
    <span class=${"dot " + connection}></span><span class="label">${CONNECTION_TEXT[connection]}</span><//>`;
}

function App() {
  const path = useRoute();
  const [theme, setTheme] = useTheme();
  const connection = useStore((s) => s.connection);
  const access = useStore((s) => s.access);
  const current = route(path);

  useEffect(() => { if (path === "/" || path === "/index.html") navigate("/models", true); }, [path]);
  useEffect(() => {
    document.title = `${INDICATOR[connection]} ${current.title} · llama-swap`;
  }, [connection, current.title]);

  const hidden = (p) => (p === "/performance" && access.performance === false)
    || ((p === "/logs" || p === "/hardware") && access.admin === false);
  let page;
  switch (current.name) {
    case "/models": page = current.id ? html`<${ModelPage} id=${current.id} />` : html`<${ModelsPage} />`; break;
    case "/activity": page = html`<${ActivityPage} />`; break;
    case "/logs": page = html`<${LogsPage} />`; break;
    case "/performance": page = html`<${PerformancePage} />`; break;
    case "/hardware": page = access.admin === false
      ? html`<div class="page-head"><h1>Hardware</h1></div><div class="banner">The hardware page needs an admin API key.</div>`
      : html`<${HardwarePage} />`; break;
    case "/playground": page = html`<${PlaygroundPage} />`; break;
    case "/settings": page = html`<${SettingsPage} theme=${theme} setTheme=${setTheme} />`; break;
    default: page = html`<div class="page-head"><h1>Not found</h1></div><p>No page at ${path}. <${Link} to="/models">Models<//></p>`;
  }
  const dark = document.documentElement.dataset.theme === "dark";
  return html`
    <header class="topbar">
      <${Link} to="/models" class="brand"><img src="/ui/favicon.svg" alt="" />llama-swap<//>
      <nav class="nav" aria-label="Pages">
        ${PAGES.filter(([p]) => !hidden(p)).map(([p, label]) => html`
          <${Link} to=${p} aria-current=${current.name === p ? "page" : undefined}>${label}<//>`)}
      </nav>
      <div class="tools">
        <${ProfileSwitch} />
        <${Indicator} />
        <button class="small" id="theme-toggle" onClick=${() => setTheme(dark ? "light" : "dark")}
                aria-label=${dark ? "Use the light theme" : "Use the dark theme"} title="Theme">${dark ? "☀" : "☾"}</button>
      </div>
    </header>
    ${connection === "unauthorized" && html`<div class="banner bad" style="margin:1rem">The server no longer accepts this browser's API key. <button class="link" onClick=${() => location.reload()}>Reload to sign in</button></div>`}
    <main class="page" id="main" data-page=${current.name}>${page}</main>
    <${Toasts} />`;
}

start();
const root = document.getElementById("app");
root.textContent = ""; // the "Loading" line
render(html`<${App} />`, root);
