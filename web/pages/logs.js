// Logs: the proxy's and the upstreams' logs live from the event stream, or one model's own
// log stream; follow mode, ANSI colours, a bounded number of lines.

import { html, useState, useStored } from "../lib.js";
import { useStore } from "../events.js";
import { LogView, useModelLog, MAX_LINES } from "../components/logview.js";
import { Tabs } from "../components/ui.js";

function Pane({ title, text, follow, id, short }) {
  const [mark, setMark] = useState(""); // the text's end when "Clear" was pressed
  const all = text || "";
  const at = mark ? all.lastIndexOf(mark) : -1;
  const shown = at >= 0 ? all.slice(at + mark.length) : all;
  return html`
    <div class="logpane">
      <h3>${title}<button class="small" style="margin-left:auto" onClick=${() => setMark(all.slice(-200))}>Clear</button></h3>
      <${LogView} text=${shown} follow=${follow} label=${title} id=${id} short=${short} />
    </div>`;
}

function ModelPane({ model, follow }) {
  const { text, error, live } = useModelLog(model);
  return html`
    ${error && html`<p class="error">${error.message}</p>`}
    <${Pane} title=${`${model}${live ? "" : " (not connected)"}`} text=${text} follow=${follow} id="log-model" />`;
}

export function LogsPage() {
  const logs = useStore((s) => s.logs);
  const models = useStore((s) => s.models) || [];
  const admin = useStore((s) => s.access.admin);
  const [view, setView] = useStored("logs.view", "both");
  const [follow, setFollow] = useState(true);
  const [model, setModel] = useState("");
  const local = models.filter((m) => !m.peerID);
  const chosen = model || local[0]?.id || "";
  if (admin === false) {
    return html`<div class="page-head"><h1>Logs</h1></div><div class="banner">Logs need an admin API key.</div>`;
  }
  return html`
    <div class="page-head">
      <h1>Logs</h1>
      <div class="actions">
        <label class="check"><input type="checkbox" checked=${follow} onChange=${(e) => setFollow(e.target.checked)} name="follow" />Follow</label>
        <span class="muted small">last ${MAX_LINES} lines</span>
      </div>
    </div>
    <${Tabs} tabs=${[["both", "Proxy + upstream"], ["proxy", "Proxy"], ["upstream", "Upstream"], ["model", "Model"]]}
             value=${view} onChange=${setView} label="Log streams" />
    ${view === "model" && html`
      <label class="field" style="max-width:320px"><span>Model</span>
        <select value=${chosen} onChange=${(e) => setModel(e.target.value)} name="log_model">
          ${local.map((m) => html`<option value=${m.id}>${m.id}</option>`)}
        </select></label>`}
    <div class=${"logs" + (view === "both" ? " both" : "")}>
      ${(view === "both" || view === "proxy") && html`<${Pane} title="Proxy" text=${logs.proxy} follow=${follow} id="log-proxy" />`}
      ${(view === "both" || view === "upstream") && html`<${Pane} title="Upstream" text=${logs.upstream} follow=${follow} id="log-upstream" />`}
      ${view === "model" && chosen && html`<${ModelPane} key=${chosen} model=${chosen} follow=${follow} />`}
    </div>`;
}
