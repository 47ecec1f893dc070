// Activity: totals and speed histograms, requests in flight (with cancel), the activity table.

import { html, useEffect, useState, Link, modelPath, num, bytes, duration, toast } from "../lib.js";
import { api } from "../api.js";
import { useStore } from "../events.js";
import { Histogram } from "../components/histogram.js";
import { ActivityTable, useThrottled } from "../components/activity.js";
import { ErrorNote } from "../components/ui.js";

function useStats() {
  const seq = useThrottled(useStore((s) => s.activity.seq));
  const [state, setState] = useState({ data: null, error: null });
  useEffect(() => {
    let live = true;
    api.stats().then(
      (data) => live && setState({ data, error: null }),
      (error) => live && setState((s) => ({ data: s.data, error })),
    );
    return () => { live = false; };
  }, [seq]);
  return state;
}

function Stats() {
  const { data, error } = useStats();
  const s = data || {};
  return html`
    <${ErrorNote} error=${error} />
    <div class="stats" id="stats">
      <div class="stat"><div class="label">Requests</div><div class="value" data-stat="requests">${num(s.total_requests)}</div></div>
      <div class="stat"><div class="label">Input tokens</div><div class="value">${num(s.total_input_tokens)}</div></div>
      <div class="stat"><div class="label">Output tokens</div><div class="value">${num(s.total_output_tokens)}</div></div>
      <div class="stat"><div class="label">Cached tokens</div><div class="value">${num(s.total_cache_tokens)}</div></div>
    </div>
    <div class="grid" style="margin-bottom:1rem">
      <${Histogram} title="Prefill speed" hist=${s.prompt_histogram} />
      <${Histogram} title="Decode speed" hist=${s.gen_histogram} />
    </div>`;
}

const headerOf = (headers, name) => {
  const found = Object.entries(headers || {}).find(([k]) => k.toLowerCase() === name.toLowerCase());
  return found ? (Array.isArray(found[1]) ? found[1].join(", ") : found[1]) : "";
};

function Inflight() {
  const inflight = useStore((s) => s.inflight);
  const sessionHeaders = useStore((s) => s.uiConfig?.activity?.session_id || []);
  const admin = useStore((s) => s.access.admin);
  const [, tick] = useState(0);
  const [cancelling, setCancelling] = useState({});
  const rows = Object.values(inflight).sort((a, b) => Number(a.id) - Number(b.id));
  useEffect(() => {
    if (!rows.length) return undefined;
    const timer = setInterval(() => tick((t) => t + 1), 1000);
    return () => clearInterval(timer);
  }, [rows.length > 0]);
  const cancel = async (id) => {
    setCancelling((c) => ({ ...c, [id]: true }));
    try { await api.cancel(id); } catch (e) { toast(`Cancel failed: ${e.message}`); }
  };
  const session = (r) => sessionHeaders.map((h) => headerOf(r.req_headers, h)).find(Boolean) || "";
  return html`
    <section aria-label="In flight" style="margin-bottom:1.2rem">
      <h2>In flight <span class="muted small">${rows.length}</span></h2>
      <div class="table-wrap">
        <table class="inflight">
          <thead><tr><th>ID</th><th class="num">Elapsed</th><th>Model</th><th>Request</th><th>Address</th><th>User agent</th>
            <th>Session</th><th class="num">Received</th>${admin !== false && html`<th></th>`}</tr></thead>
          <tbody>
            ${rows.map((r) => html`<tr data-inflight=${r.id}>
              <td>${r.id}</td>
              <td class="num">${duration(r.elapsed_ms + (Date.now() - r.seenAt))}</td>
              <td><${Link} to=${modelPath(r.model)}>${r.model}<//></td>
              <td class="mono">${r.method} ${r.req_path}</td>
              <td class="mono">${r.remote_ip}</td>
              <td class="small">${headerOf(r.req_headers, "user-agent")}</td>
              <td class="mono small">${session(r)}</td>
              <td class="num">${bytes(r.resp_bytes)}</td>
              ${admin !== false && html`<td><button class="small danger" disabled=${cancelling[r.id]} onClick=${() => cancel(r.id)}>${cancelling[r.id] ? "Cancelling…" : "Cancel"}</button></td>`}
            </tr>`)}
            ${!rows.length && html`<tr><td class="empty" colspan="9">Nothing in flight.</td></tr>`}
          </tbody>
        </table>
      </div>
    </section>`;
}

export function ActivityPage() {
  return html`
    <div class="page-head"><h1>Activity</h1></div>
    <${Stats} />
    <${Inflight} />
    <${ActivityTable} title="Requests" />`;
}
