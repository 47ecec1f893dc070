// llama-swap's speed histograms (/api/metrics/stats): bins as bars, percentiles below.

import { html } from "../lib.js";

export function Histogram({ title, hist }) {
  if (!hist || !hist.bins || !hist.bins.length) {
    return html`<div class="card"><h3>${title}</h3><p class="muted">No requests with speeds yet.</p></div>`;
  }
  const peak = Math.max(...hist.bins, 1);
  const lo = hist.min;
  const size = hist.binSize || 0;
  return html`
    <div class="card">
      <h3>${title}</h3>
      <div class="hist" role="img" aria-label=${`${title}: ${hist.bins.length} bins from ${lo.toFixed(1)} to ${hist.max.toFixed(1)} tokens per second`}>
        ${hist.bins.map((n, i) => html`<div class="bar" style=${`height:${Math.max(1, (100 * n) / peak)}%`}
             title=${`${(lo + i * size).toFixed(1)}–${(lo + (i + 1) * size).toFixed(1)} t/s: ${n}`}></div>`)}
      </div>
      <div class="hist-axis"><span>${lo.toFixed(1)} t/s</span><span>${hist.max.toFixed(1)} t/s</span></div>
      <div class="pcts"><span>p50 ${hist.p50.toFixed(1)}</span><span>p95 ${hist.p95.toFixed(1)}</span><span>p99 ${hist.p99.toFixed(1)}</span></div>
    </div>`;
}
