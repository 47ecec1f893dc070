// Models: every model with its state, load / unload / unload all, the upstream link,
// aliases, unlisted models on request; peers' models; profiles and selectors.

import { html, useEffect, useState, useStored, Link, modelPath, bytes, toast, load as loadSetting } from "../lib.js";
import { api, encodeModel } from "../api.js";
import { update, useStore } from "../events.js";
import { StateBadge, ErrorNote } from "../components/ui.js";

const CAPS = { vision: "vision", function_calling: "tools", audio_transcriptions: "transcription", audio_speech: "speech",
  image_generation: "images", image_to_image: "img2img", reranker: "rerank" };
// /v1/models records that name no model of their own (shown in their own cards, or not at all)
const NOT_MODELS = ["alias", "selector", "profile"];

/** /v1/models (what this key may use), refetched when the set of models or states change. */
export function useModelRecords(refreshKey) {
  const [records, setRecords] = useState({ data: null, error: null });
  useEffect(() => {
    let live = true;
    api.models().then((doc) => live && setRecords({ data: doc.data || [], error: null }),
      (error) => live && setRecords((r) => ({ data: r.data, error })));
    return () => { live = false; };
  }, [refreshKey]);
  return records;
}

/** Model rows from modelStatus (admin keys), or from /v1/models for other keys. */
export function useModels() {
  const status = useStore((s) => s.models);
  const admin = useStore((s) => s.access.admin);
  const seq = useStore((s) => s.activity.seq);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (status !== null) return undefined;
    const timer = setInterval(() => setTick((t) => t + 1), 5000); // no live model states for this key
    return () => clearInterval(timer);
  }, [status === null]);
  const ids = status ? status.map((m) => m.id).join(",") : "";
  const records = useModelRecords(status ? ids : `${tick}:${seq}`);
  const byId = new Map((records.data || []).map((r) => [r.id, r]));
  let rows;
  if (status) {
    rows = status.map((m) => ({ ...m, record: byId.get(m.id) }));
  } else {
    rows = (records.data || []).filter((r) => !NOT_MODELS.includes(r.meta?.llamaswap?.type)).map((r) => ({
      id: r.id, name: r.name || "", description: r.description || "", unlisted: false,
      peerID: r.meta?.llamaswap?.peerID || "", aliases: r.meta?.llamaswap?.aliases,
      available: r.meta?.llamaswap?.available,
      state: r.meta?.llamaswap?.peerID ? "" : r.status?.value === "loaded" ? "ready" : "stopped", record: r,
    }));
  }
  return { rows, records, admin, live: status !== null };
}

function Caps({ record }) {
  const caps = Object.entries(record?.capabilities || {}).filter(([, v]) => v).map(([k]) => CAPS[k] || k);
  const ctx = record?.context_length || record?.meta?.n_ctx;
  if (!caps.length && !ctx) return null;
  return html`<div>${caps.map((c) => html`<span class="chip">${c}</span>`)}${ctx ? html`<span class="chip">${Math.round(ctx / 1024)}k ctx</span>` : ""}</div>`;
}

function footprintText(fp) {
  if (!fp) return "";
  const measured = fp.measured?.vram;
  const planned = fp.planned?.vram ?? fp.declared?.vram;
  if (measured) return `${bytes(measured)} VRAM`;
  if (planned) return `~${bytes(planned)} VRAM`;
  return "";
}

/** Load / unload / open buttons of one model (admin keys: they use admin-only routes). */
export function ModelActions({ model, compact = false }) {
  const [busy, setBusy] = useState(null);
  const admin = useStore((s) => s.access.admin);
  if (admin === false) return null;
  const state = model.state;
  const run = async (what, fn) => {
    setBusy(what);
    try {
      await fn();
    } catch (e) {
      toast(`${what === "load" ? "Loading" : "Unloading"} ${model.id} failed: ${e.message}`);
    } finally {
      setBusy(null);
    }
  };
  const loading = busy === "load" || state === "starting";
  const canUnload = state === "ready" || state === "starting";
  return html`
    ${canUnload || busy === "unload"
      ? html`<button class="small" data-action="unload" disabled=${busy !== null || state === "stopping"}
                     onClick=${() => run("unload", () => api.unload(model.id))}>${busy === "unload" || state === "stopping" ? "Unloading…" : "Unload"}</button>`
      : html`<button class="small primary" data-action="load" disabled=${loading || state === "stopping" || state === "shutdown"}
                     onClick=${() => run("load", () => api.load(model.id))}>${loading ? "Loading…" : "Load"}</button>`}
    <a class="button small" href=${`/upstream/${encodeModel(model.id)}/`} target="_blank" rel="noopener"
       title="Open the model's own server (/upstream/${model.id}/)">${compact ? "Open" : "Open ↗"}</a>`;
}

function ModelRow({ model, showCaps }) {
  const fp = footprintText(model.footprint);
  return html`
    <tr data-model=${model.id} data-state=${model.state}>
      <td>
        <div><${Link} to=${modelPath(model.id)} class="model-name">${model.id}<//>
          ${model.name && model.name !== model.id ? html` <span class="muted">${model.name}</span>` : ""}
          ${model.unlisted ? html` <span class="chip">unlisted</span>` : ""}</div>
        ${model.description && html`<div class="model-desc">${model.description}</div>`}
        ${model.aliases?.length ? html`<div class="small">aliases: ${model.aliases.map((a) => html`<span class="chip">${a}</span>`)}</div>` : ""}
        ${showCaps && html`<${Caps} record=${model.record} />`}
      </td>
      <td><${StateBadge} state=${model.state} />${fp && html`<div class="small muted">${fp}</div>`}</td>
      <td class="actions"><${ModelActions} model=${model} /></td>
    </tr>`;
}

function ProfilesCard() {
  const profiles = useStore((s) => s.access.profiles);
  const active = useStore((s) => s.profile.active);
  const [error, setError] = useState(null);
  if (!profiles || !Array.isArray(profiles.profiles) || !profiles.profiles.length) return null;
  const current = profiles.profiles.find((p) => p.id === active);
  const choose = async (name) => {
    setError(null);
    try {
      const doc = await api.setProfile(name || null);
      update({ profile: { active: doc.active ?? null } });
    } catch (e) {
      setError(e);
    }
  };
  return html`
    <div class="card" id="profiles">
      <h2>Profiles</h2>
      <label class="field"><span>Active profile</span>
        <select value=${active || ""} onChange=${(e) => choose(e.target.value)} name="profile">
          <option value="">(none)</option>
          ${profiles.profiles.map((p) => html`<option value=${p.id}>${p.id}</option>`)}
        </select>
      </label>
      <${ErrorNote} error=${error} />
      ${current ? html`
        ${current.description && html`<p class="muted">${current.description}</p>`}
        <div class="table-wrap"><table><thead><tr><th>Requested</th><th>Served by</th></tr></thead><tbody>
          ${Object.entries(current.pins || {}).map(([k, v]) => html`<tr><td class="mono">${k}</td><td class="mono">${v || html`<span class="muted">(disabled)</span>`}</td></tr>`)}
        </tbody></table></div>` : html`<p class="muted small">No profile active: every id is served as configured.</p>`}
    </div>`;
}

function SelectorsCard({ records }) {
  const selectors = (records || []).filter((r) => r.meta?.llamaswap?.type === "selector");
  if (!selectors.length) return null;
  return html`
    <div class="card" id="selectors">
      <h2>Selectors</h2>
      <div class="table-wrap"><table><thead><tr><th>Selector</th><th>Strategy</th><th>Targets</th><th class="num">Spillover</th><th>State</th></tr></thead><tbody>
        ${selectors.map((s) => {
          const m = s.meta.llamaswap;
          return html`<tr><td class="mono">${s.id}</td><td>${m.strategy}</td>
            <td>${(m.targets || []).map((t) => html`<span class="chip">${t}</span>`)}</td>
            <td class="num">${m.spillover ?? "–"}</td><td>${s.status?.value || ""}</td></tr>`;
        })}
      </tbody></table></div>
    </div>`;
}

export function ModelsPage() {
  const { rows, records, admin, live } = useModels();
  const [showUnlisted, setShowUnlisted] = useStored("models.showUnlisted", false);
  const showCaps = loadSetting("models.showCaps", true);
  const [unloading, setUnloading] = useState(false);
  const local = rows.filter((m) => !m.peerID && (showUnlisted || !m.unlisted));
  const hiddenCount = rows.filter((m) => !m.peerID && m.unlisted).length;
  const peers = rows.filter((m) => m.peerID);
  const byPeer = new Map();
  for (const m of peers) byPeer.set(m.peerID, [...(byPeer.get(m.peerID) || []), m]);
  const running = rows.filter((m) => !m.peerID && m.state && m.state !== "stopped").length;

  const unloadAll = async () => {
    setUnloading(true);
    try { await api.unloadAll(); } catch (e) { toast(`Unload all failed: ${e.message}`); } finally { setUnloading(false); }
  };

  return html`
    <div class="page-head">
      <h1>Models</h1>
      <span class="muted">${local.length} model${local.length === 1 ? "" : "s"}, ${running} running</span>
      <div class="actions">
        ${hiddenCount > 0 && html`<label class="check"><input type="checkbox" checked=${showUnlisted} name="show_unlisted"
            onChange=${(e) => setShowUnlisted(e.target.checked)} />Show unlisted (${hiddenCount})</label>`}
        ${admin !== false && html`<button id="unload-all" class="danger" disabled=${unloading || running === 0} onClick=${unloadAll}>${unloading ? "Unloading…" : "Unload all"}</button>`}
      </div>
    </div>
    ${!live && admin === false && html`<div class="banner">This API key sees the models it may use; loading and unloading need an admin key.</div>`}
    <${ErrorNote} error=${records.error} />
    <div class="table-wrap">
      <table class="models">
        <thead><tr><th>Model</th><th>State</th><th class="right">Actions</th></tr></thead>
        <tbody>
          ${local.map((m) => html`<${ModelRow} key=${m.id} model=${m} showCaps=${showCaps} />`)}
          ${!local.length && html`<tr><td colspan="3" class="empty">${records.data || live ? "No models configured." : "Loading…"}</td></tr>`}
        </tbody>
      </table>
    </div>
    ${byPeer.size > 0 && html`
      <h2 style="margin-top:1.2rem">Peers</h2>
      ${[...byPeer.entries()].map(([peer, models]) => html`
        <div class="card" data-peer=${peer}>
          <h3>${peer}${models.some((m) => m.available === false) && html` <span class="chip" data-available="false">unavailable</span>`}</h3>
          ${models.map((m) => html`<span class="chip mono">${m.id}</span>`)}
        </div>`)}`}
    <div class="grid" style="margin-top:1rem">
      <${ProfilesCard} />
      <${SelectorsCard} records=${records.data} />
    </div>`;
}
