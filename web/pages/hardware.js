// Hardware: /api/hardware (OS, kernel, CPU, memory, accelerators) with a copyable summary.

import { html, useEffect, useState } from "../lib.js";
import { api } from "../api.js";
import { CopyButton, ErrorNote, useLoad } from "../components/ui.js";

const mb = (n) => (n >= 1024 ? `${(n / 1024).toFixed(1)} GiB` : `${n} MiB`);

export function hardwareSummary(hw, version) {
  const os = hw.operating_system || {};
  const env = hw.environment || {};
  const lines = [
    `llama-swap ${version?.version || env.llamaswap || ""} (llamaswap, Python ${env.python || "?"})`.trim(),
    `OS: ${os.name || "?"} (${os.family || ""} kernel ${os.kernel || "?"}), ${hw.architecture || "?"}`,
  ];
  if (env.container) lines.push(`Container: ${env.container}`);
  if (hw.cpu) lines.push(`CPU: ${hw.cpu.model || "?"}, ${hw.cpu.physical_cores} cores / ${hw.cpu.logical_cores} threads${hw.cpu.max_mhz ? `, ${hw.cpu.max_mhz} MHz max` : ""}`);
  if (hw.memory) lines.push(`Memory: ${mb(hw.memory.total_mb)} (swap ${mb(hw.memory.swap_total_mb)})`);
  const accel = hw.accelerators || [];
  if (!accel.length) lines.push("Accelerators: none found");
  for (const a of accel) {
    lines.push(`GPU ${a.index}: ${a.vendor} ${a.name}, ${mb(a.memory_total_mb)}, driver ${a.driver_version || "?"}`
      + `${a.cuda_version ? `, CUDA ${a.cuda_version}` : ""}${a.power_limit_w ? `, power limit ${a.power_limit_w} W` : ""}`);
  }
  lines.push(`Captured ${hw.captured_at}`);
  return lines.join("\n");
}

export function HardwarePage() {
  const { data, error, loading } = useLoad(api.hardware);
  const [version, setVersion] = useState(null);
  useEffect(() => { api.version().then(setVersion, () => setVersion(null)); }, []);
  if (loading) return html`<div class="page-head"><h1>Hardware</h1></div><p class="muted">Reading the hardware…</p>`;
  if (error) return html`<div class="page-head"><h1>Hardware</h1></div><${ErrorNote} error=${error} />`;
  const hw = data;
  const os = hw.operating_system || {};
  const env = hw.environment || {};
  const summary = hardwareSummary(hw, version);
  return html`
    <div class="page-head">
      <h1>Hardware</h1>
      <div class="actions"><${CopyButton} text=${summary} label="Copy summary" className="" /></div>
    </div>
    <div class="grid">
      <div class="card"><h2>System</h2><dl class="kv">
        <dt>OS</dt><dd>${os.name}</dd>
        <dt>Kernel</dt><dd class="mono">${os.family} ${os.kernel}</dd>
        <dt>Architecture</dt><dd>${hw.architecture}</dd>
        <dt>Host</dt><dd>${os.hostname}</dd>
      </dl></div>
      <div class="card"><h2>Environment</h2><dl class="kv">
        <dt>llama-swap</dt><dd>${version?.version || env.llamaswap}${version && version.commit !== "unknown" ? ` (${version.commit})` : ""}</dd>
        <dt>Python</dt><dd>${env.python_implementation} ${env.python}</dd>
        <dt>Container</dt><dd>${env.container || "none detected"}</dd>
      </dl></div>
      ${hw.cpu && html`<div class="card"><h2>CPU</h2><dl class="kv">
        <dt>Model</dt><dd>${hw.cpu.model || "unknown"}</dd>
        <dt>Cores</dt><dd>${hw.cpu.physical_cores} physical, ${hw.cpu.logical_cores} logical</dd>
        ${hw.cpu.max_mhz > 0 && html`<dt>Max clock</dt><dd>${hw.cpu.max_mhz} MHz</dd>`}
      </dl></div>`}
      ${hw.memory && html`<div class="card"><h2>Memory</h2><dl class="kv">
        <dt>Total</dt><dd>${mb(hw.memory.total_mb)}</dd>
        <dt>Available</dt><dd>${mb(hw.memory.available_mb)} (at capture)</dd>
        <dt>Swap</dt><dd>${mb(hw.memory.swap_total_mb)}</dd>
      </dl></div>`}
    </div>
    <h2 style="margin-top:1.2rem">Accelerators</h2>
    ${(hw.accelerators || []).length === 0 ? html`<p class="muted" id="no-accelerators">No accelerators found (NVIDIA GPUs are read through NVML or nvidia-smi).</p>` : html`
      <div class="grid">${hw.accelerators.map((a) => html`
        <div class="card" data-gpu=${a.index}><h3>GPU ${a.index}: ${a.name}</h3><dl class="kv">
          <dt>Vendor</dt><dd>${a.vendor}</dd>
          <dt>Memory</dt><dd>${mb(a.memory_total_mb)}</dd>
          <dt>Driver</dt><dd>${a.driver_version || "?"}${a.cuda_version ? ` (CUDA ${a.cuda_version})` : ""}</dd>
          ${a.power_limit_w > 0 && html`<dt>Power limit</dt><dd>${a.power_limit_w} W</dd>`}
          ${a.pci_bus_id && html`<dt>PCI</dt><dd class="mono">${a.pci_bus_id}</dd>`}
          <dt>UUID</dt><dd class="mono small">${a.uuid}</dd>
        </dl></div>`)}</div>`}
    <h2 style="margin-top:1.2rem">Summary</h2>
    <pre class="raw" id="hardware-summary">${summary}</pre>
    ${(hw.capture?.errors || []).length > 0 && html`<p class="muted small">Not read: ${hw.capture.errors.join("; ")}</p>`}`;
}
