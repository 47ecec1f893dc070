// One model: its state, load / unload / open, details, its own activity and live log.

import { html, useState, Link } from "../lib.js";
import { useStore } from "../events.js";
import { StateBadge, Tabs } from "../components/ui.js";
import { ActivityTable } from "../components/activity.js";
import { LogView, useModelLog } from "../components/logview.js";
import { ModelActions, useModels } from "./models.js";

function Details({ model }) {
  const r = model.record || {};
  const caps = Object.entries(r.capabilities || {}).filter(([, v]) => v).map(([k]) => k);
  const meta = { ...(r.meta?.llamaswap || {}) };
  delete meta.type;
  delete meta.aliases;
  return html`
    <div class="card">
      <dl class="kv">
        <dt>ID</dt><dd class="mono">${model.id}</dd>
        ${model.name && html`<dt>Name</dt><dd>${model.name}</dd>`}
        ${model.description && html`<dt>Description</dt><dd>${model.description}</dd>`}
        <dt>State</dt><dd><${StateBadge} state=${model.state} /></dd>
        <dt>Aliases</dt><dd>${model.aliases?.length ? model.aliases.map((a) => html`<span class="chip">${a}</span>`) : html`<span class="muted">none</span>`}</dd>
        ${model.unlisted && html`<dt>Listed</dt><dd>no (unlisted: not in /v1/models, still routable)</dd>`}
        ${caps.length > 0 && html`<dt>Capabilities</dt><dd>${caps.map((c) => html`<span class="chip">${c}</span>`)}</dd>`}
        ${(r.context_length || r.meta?.n_ctx) && html`<dt>Context</dt><dd>${r.context_length || r.meta.n_ctx} tokens</dd>`}
        ${Object.keys(meta).length > 0 && html`<dt>Metadata</dt><dd><pre class="json">${JSON.stringify(meta, null, 2)}</pre></dd>`}
      </dl>
    </div>`;
}

function ModelLog({ id }) {
  const { text, error, live } = useModelLog(id);
  const [follow, setFollow] = useState(true);
  return html`
    <div class="logpane">
      <h3>Log of ${id} <span class="muted small">${live ? "live" : error ? "" : "connecting…"}</span>
        <label class="check small" style="margin-left:auto"><input type="checkbox" checked=${follow} onChange=${(e) => setFollow(e.target.checked)} />Follow</label></h3>
      ${error && html`<p class="error">${error.forbidden ? "Logs need an admin API key." : error.message}</p>`}
      <${LogView} text=${text} follow=${follow} label=${`Log of ${id}`} id="model-log" />
    </div>`;
}

export function ModelPage({ id }) {
  const { rows, records } = useModels();
  const admin = useStore((s) => s.access.admin);
  const [tab, setTab] = useState("details");
  const model = rows.find((m) => m.id === id);
  if (!model) {
    return html`<div class="page-head"><h1>${id}</h1></div>
      <p class="muted">${records.data ? html`No model “${id}” here. <${Link} to="/models">All models<//>` : "Loading…"}</p>`;
  }
  const tabs = [["details", "Details"], ["activity", "Activity"]];
  if (admin !== false) tabs.push(["logs", "Logs"]);
  return html`
    <div class="page-head">
      <h1><${Link} to="/models" class="muted" style="text-decoration:none">Models /<//> ${model.id}</h1>
      <${StateBadge} state=${model.state} />
      <div class="actions"><${ModelActions} model=${model} /></div>
    </div>
    <${Tabs} tabs=${tabs} value=${tab} onChange=${setTab} label="Model views" />
    ${tab === "details" && html`<${Details} model=${model} />`}
    ${tab === "activity" && html`<${ActivityTable} model=${model.id} title=${`Activity of ${model.id}`} />`}
    ${tab === "logs" && html`<${ModelLog} id=${model.id} />`}`;
}
