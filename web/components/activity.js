// The activity table (/api/metrics/activity): sortable, paginated, column toggles and page
// size kept in localStorage, ID-range filter, capture viewer, markdown export.  Refetches when
// the event stream says a request was recorded.

import { html, useEffect, useRef, useState, useStored, Link, modelPath, clock, tokens, speed, duration, num, download } from "../lib.js";
import { api } from "../api.js";
import { useStore } from "../events.js";
import { CaptureViewer } from "./capture.js";
import { Dialog, CopyButton, ErrorNote } from "./ui.js";

const PAGE_SIZES = [10, 25, 50, 100, 250];

const drafted = (t) => (t.draft_tokens > 0 ? `${t.draft_acc_tokens}/${t.draft_tokens}` : "–");
const meta = (r) => Object.entries(r.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ");

/** Columns: key, label, API sort key (none: not sortable), text for markdown, cell. */
export const COLUMNS = [
  { key: "id", label: "ID", sort: "id", num: true, text: (r) => String(r.id) },
  { key: "time", label: "Time", sort: "time", text: (r) => clock(r.timestamp) },
  { key: "model", label: "Model", sort: "model", text: (r) => r.model, cell: (r) => html`<${Link} to=${modelPath(r.model)}>${r.model}<//>` },
  { key: "key", label: "Key", sort: "key", text: (r) => r.key_name || "" },
  { key: "path", label: "Path", sort: "req_path", text: (r) => r.req_path, cell: (r) => html`<span class="mono">${r.req_path}</span>` },
  { key: "status", label: "Status", sort: "resp_status_code", num: true, text: (r) => String(r.resp_status_code),
    cell: (r) => html`<span class=${r.resp_status_code >= 400 ? "status-bad" : "status-ok"} title=${r.error_msg || ""}>${r.resp_status_code}</span>` },
  { key: "ctype", label: "Content-Type", sort: "resp_content_type", text: (r) => r.resp_content_type || "" },
  { key: "cached", label: "Cached", sort: "cached", num: true, text: (r) => tokens(r.tokens.cache_tokens) },
  { key: "prompt", label: "Prompt", sort: "prompt", num: true, text: (r) => tokens(r.tokens.input_tokens) },
  { key: "generated", label: "Generated", sort: "generated", num: true, text: (r) => tokens(r.tokens.output_tokens) },
  { key: "drafted", label: "Drafted", sort: "drafted", num: true, text: (r) => drafted(r.tokens) },
  { key: "prefill", label: "Prefill", sort: "prompt_speed", num: true, text: (r) => speed(r.tokens.prompt_per_second) },
  { key: "decode", label: "Decode", sort: "gen_speed", num: true, text: (r) => speed(r.tokens.tokens_per_second) },
  { key: "duration", label: "Duration", sort: "duration", num: true, text: (r) => duration(r.duration_ms) },
  { key: "capture", label: "Capture", text: (r) => (r.has_capture ? "yes" : "") },
  { key: "meta", label: "Meta", text: (r) => [meta(r), r.error_msg || ""].filter(Boolean).join(" ") },
];
const DEFAULT_HIDDEN = ["ctype", "key", "drafted"];

function markdownTable(rows, columns) {
  const esc = (s) => String(s).replace(/\|/g, "\\|").replace(/\n/g, " ");
  const head = `| ${columns.map((c) => c.label).join(" | ")} |`;
  const rule = `| ${columns.map((c) => (c.num ? "---:" : "---")).join(" | ")} |`;
  return [head, rule, ...rows.map((r) => `| ${columns.map((c) => esc(c.text(r))).join(" | ")} |`)].join("\n");
}

export function activityMarkdown(rows, columns, stats, model) {
  const lines = [`# llama-swap activity${model ? ` for ${model}` : ""}`, "", `Exported ${new Date().toLocaleString()}.`, ""];
  if (stats) {
    lines.push("## Summary", "",
      `- Requests: ${num(stats.total_requests)}`,
      `- Input tokens: ${num(stats.total_input_tokens)}`,
      `- Output tokens: ${num(stats.total_output_tokens)}`,
      `- Cached tokens: ${num(stats.total_cache_tokens)}`);
    for (const [name, h] of [["Prefill", stats.prompt_histogram], ["Decode", stats.gen_histogram]]) {
      if (h) lines.push(`- ${name} speed: p50 ${h.p50.toFixed(1)} t/s, p95 ${h.p95.toFixed(1)} t/s, p99 ${h.p99.toFixed(1)} t/s`);
    }
    lines.push("");
  }
  lines.push("## Requests", "", markdownTable(rows, columns.filter((c) => c.key !== "capture")), "");
  return lines.join("\n");
}

function ColumnToggles({ hidden, setHidden, onClose }) {
  const toggle = (key) => setHidden((h) => (h.includes(key) ? h.filter((k) => k !== key) : [...h, key]));
  return html`
    <div class="card" role="group" aria-label="Columns">
      <div class="row" style="align-items:center">
        <strong>Columns</strong>
        ${COLUMNS.map((c) => html`<label class="check"><input type="checkbox" checked=${!hidden.includes(c.key)}
            onChange=${() => toggle(c.key)} data-column=${c.key} />${c.label}</label>`)}
        <button class="small" onClick=${() => setHidden(DEFAULT_HIDDEN)}>Defaults</button>
        <button class="small" onClick=${onClose}>Done</button>
      </div>
    </div>`;
}

function RangeFilter({ filter, setFilter, onClose }) {
  const [minId, setMin] = useState(filter.minId || "");
  const [maxId, setMax] = useState(filter.maxId || "");
  const apply = (e) => {
    e.preventDefault();
    setFilter({ minId: minId ? String(parseInt(minId, 10) || "") : "", maxId: maxId ? String(parseInt(maxId, 10) || "") : "" });
  };
  return html`
    <form class="card row" onSubmit=${apply} aria-label="Filter">
      <label class="field"><span>From ID</span><input name="min_id" type="number" min="1" value=${minId} onInput=${(e) => setMin(e.target.value)} /></label>
      <label class="field"><span>To ID</span><input name="max_id" type="number" min="1" value=${maxId} onInput=${(e) => setMax(e.target.value)} /></label>
      <div class="row" style="margin-bottom:.6rem">
        <button type="submit" class="primary">Apply</button>
        <button type="button" onClick=${() => { setMin(""); setMax(""); setFilter({ minId: "", maxId: "" }); }}>Clear</button>
        <button type="button" onClick=${onClose}>Close</button>
      </div>
    </form>`;
}

/** ``value`` (a counter bumped by events), passed on at most every ``ms``: a busy server's
 * stream of new rows refetches a few times a second, not once per row. */
export function useThrottled(value, ms = 400) {
  const [shown, setShown] = useState(value);
  const timer = useRef(null);
  const latest = useRef(value);
  latest.current = value;
  useEffect(() => {
    if (value === shown || timer.current) return;
    timer.current = setTimeout(() => { timer.current = null; setShown(latest.current); }, ms);
  }, [value]);
  useEffect(() => () => clearTimeout(timer.current), []);
  return shown;
}

export function ActivityTable({ model, title = "Activity" }) {
  const seq = useStore((s) => s.activity.seq);
  const admin = useStore((s) => s.access.admin);
  const [pageSize, setPageSize] = useStored("activity.pageSize", 25);
  const [hidden, setHidden] = useStored("activity.hidden", DEFAULT_HIDDEN);
  const [sort, setSort] = useState({ key: "id", order: "desc" });
  const [page, setPage] = useState(1);
  const [filter, setFilter] = useState({ minId: "", maxId: "" });
  const [panel, setPanel] = useState(null); // "columns" | "filter"
  const [result, setResult] = useState({ data: null, error: null });
  const [capture, setCapture] = useState(null);
  const [exported, setExported] = useState(null);

  const query = () => {
    const q = new URLSearchParams({ limit: String(pageSize), page: String(page), sort: sort.key, order: sort.order });
    if (model) q.append("model", model);
    if (filter.minId) q.set("min_id", filter.minId);
    if (filter.maxId) q.set("max_id", filter.maxId);
    return q.toString();
  };

  const fresh = useThrottled(seq);
  const params = query();
  useEffect(() => {
    let live = true;
    api.activity(params).then(
      (data) => { if (live) setResult({ data, error: null }); },
      (error) => { if (live) setResult((r) => ({ data: r.data, error })); },
    );
    return () => { live = false; };
  }, [params, fresh]);

  const columns = COLUMNS.filter((c) => !hidden.includes(c.key) && !(c.key === "capture" && admin === false));
  const rows = result.data?.data || [];
  const total = result.data?.total ?? 0;
  const pages = Math.max(1, result.data?.total_pages || 1);

  const onSort = (c) => {
    if (!c.sort) return;
    setSort((s) => ({ key: c.sort, order: s.key === c.sort && s.order === "desc" ? "asc" : "desc" }));
    setPage(1);
  };
  const onExport = async () => {
    let stats = null;
    try { stats = await api.stats(model); } catch (e) { stats = null; }
    setExported(activityMarkdown(rows, columns, stats, model));
  };
  const cell = (c, r) => {
    if (c.key === "capture") {
      return r.has_capture ? html`<button class="small" data-capture=${r.id} onClick=${() => setCapture(r.id)}>View</button>` : "";
    }
    return c.cell ? c.cell(r) : c.text(r);
  };

  return html`
    <section aria-label=${title}>
      <div class="page-head" style="margin-bottom:.5rem">
        <h2 style="margin:0">${title}</h2>
        <span class="muted small">${num(total)} request${total === 1 ? "" : "s"}${filter.minId || filter.maxId ? " (filtered)" : ""}</span>
        <div class="actions">
          <button class="small" aria-expanded=${panel === "filter"} onClick=${() => setPanel(panel === "filter" ? null : "filter")}>Filter</button>
          <button class="small" aria-expanded=${panel === "columns"} onClick=${() => setPanel(panel === "columns" ? null : "columns")}>Columns</button>
          <button class="small" onClick=${onExport}>Export markdown</button>
        </div>
      </div>
      ${panel === "columns" && html`<${ColumnToggles} hidden=${hidden} setHidden=${setHidden} onClose=${() => setPanel(null)} />`}
      ${panel === "filter" && html`<${RangeFilter} filter=${filter} setFilter=${(f) => { setFilter(f); setPage(1); }} onClose=${() => setPanel(null)} />`}
      <${ErrorNote} error=${result.error} />
      <div class="table-wrap">
        <table class="activity" data-total=${total}>
          <thead><tr>${columns.map((c) => html`
            <th class=${c.num ? "num" : ""} aria-sort=${sort.key === c.sort ? (sort.order === "asc" ? "ascending" : "descending") : undefined}>
              ${c.sort ? html`<button class="sort" onClick=${() => onSort(c)} data-sort=${c.sort}>${c.label}${sort.key === c.sort ? (sort.order === "asc" ? " ▲" : " ▼") : ""}</button>` : c.label}
            </th>`)}</tr></thead>
          <tbody>
            ${rows.map((r) => html`<tr data-id=${r.id}>${columns.map((c) => html`<td class=${c.num ? "num" : ""}>${cell(c, r)}</td>`)}</tr>`)}
            ${!rows.length && html`<tr><td class="empty" colspan=${columns.length}>${result.data ? "No requests recorded yet." : "Loading…"}</td></tr>`}
          </tbody>
        </table>
      </div>
      <div class="pager">
        <button class="small" disabled=${page <= 1} onClick=${() => setPage(1)} aria-label="First page">«</button>
        <button class="small" disabled=${page <= 1} onClick=${() => setPage(page - 1)} aria-label="Previous page">‹</button>
        <span class="small">Page ${page} of ${pages}</span>
        <button class="small" disabled=${page >= pages} onClick=${() => setPage(page + 1)} aria-label="Next page">›</button>
        <button class="small" disabled=${page >= pages} onClick=${() => setPage(pages)} aria-label="Last page">»</button>
        <label class="check small">Rows per page
          <select value=${pageSize} onChange=${(e) => { setPageSize(parseInt(e.target.value, 10)); setPage(1); }} name="page_size">
            ${PAGE_SIZES.map((n) => html`<option value=${n}>${n}</option>`)}
          </select>
        </label>
      </div>
      ${capture !== null && html`<${CaptureViewer} id=${capture} onClose=${() => setCapture(null)} />`}
      ${exported !== null && html`
        <${Dialog} title="Activity as markdown" onClose=${() => setExported(null)}
                   actions=${html`<${CopyButton} text=${exported} /><button class="small" onClick=${() => download("llama-swap-activity.md", exported)}>Download</button>`}>
          <textarea readonly rows="18" class="mono" aria-label="Markdown" value=${exported}></textarea>
        <//>`}
    </section>`;
}
