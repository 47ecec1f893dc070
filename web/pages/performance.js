// Performance: system and GPU charts from /api/performance, fetched incrementally with ?after=.

import { html, useEffect, useMemo, useRef, useState, useStored } from "../lib.js";
import { api } from "../api.js";
import { useStore } from "../events.js";
import { Chart } from "../components/chart.js";
import { ErrorNote } from "../components/ui.js";

const WINDOW = 720; // samples kept (an hour at 5 s)
const INTERVALS = [2, 5, 10, 30];

const ts = (s) => Date.parse(s) / 1000;

function systemSeries(sys) {
  const x = sys.map((s) => ts(s.timestamp));
  const avg = sys.map((s) => (s.cpu_util_per_core.length ? s.cpu_util_per_core.reduce((a, b) => a + b, 0) / s.cpu_util_per_core.length : null));
  const top = sys.map((s) => (s.cpu_util_per_core.length ? Math.max(...s.cpu_util_per_core) : null));
  const mem = sys.map((s) => (s.mem_total_mb ? (100 * s.mem_used_mb) / s.mem_total_mb : null));
  const swap = sys.map((s) => (s.swap_total_mb ? (100 * s.swap_used_mb) / s.swap_total_mb : 0));
  const rx = [];
  const tx = [];
  for (let i = 0; i < sys.length; i += 1) {
    if (i === 0) { rx.push(null); tx.push(null); continue; }
    const dt = x[i] - x[i - 1];
    const sum = (s, key) => s.net_io.reduce((a, n) => a + n[key], 0);
    const d = (key) => Math.max(0, sum(sys[i], key) - sum(sys[i - 1], key));
    rx.push(dt > 0 ? (d("bytes_recv") * 8) / 1e6 / dt : null);
    tx.push(dt > 0 ? (d("bytes_sent") * 8) / 1e6 / dt : null);
  }
  return {
    cpu: [x, avg, top],
    memory: [x, mem, swap],
    load: [x, sys.map((s) => s.load_avg_1), sys.map((s) => s.load_avg_5), sys.map((s) => s.load_avg_15)],
    network: [x, rx, tx],
  };
}

function gpuSeries(gpu) {
  const ids = [...new Set(gpu.map((g) => g.id))].sort((a, b) => a - b);
  const names = new Map(gpu.map((g) => [g.id, `GPU ${g.id}${g.name ? ` ${g.name}` : ""}`]));
  const times = [...new Set(gpu.map((g) => g.timestamp))].sort();
  const at = new Map(gpu.map((g) => [`${g.timestamp}|${g.id}`, g]));
  const x = times.map(ts);
  const series = (key) => [x, ...ids.map((id) => times.map((t) => at.get(`${t}|${id}`)?.[key] ?? null))];
  return {
    labels: ids.map((id) => names.get(id)),
    util: series("gpu_util_pct"),
    mem: series("mem_util_pct"),
    temp: series("temp_c"),
    vram: series("vram_temp_c"),
    power: series("power_draw_w"),
    hasVramTemp: gpu.some((g) => g.vram_temp_c > 0),
  };
}

export function PerformancePage() {
  const enabled = useStore((s) => s.access.performance);
  const [every, setEvery] = useStored("performance.every", 5);
  const [samples, setSamples] = useState({ sys: [], gpu: [] });
  const [error, setError] = useState(null);
  const last = useRef(null);

  useEffect(() => {
    if (enabled === false) return undefined;
    let live = true;
    let timer = null;
    const poll = async () => {
      try {
        const doc = await api.performance(last.current);
        if (!live) return;
        setError(null);
        const sys = doc.sys_stats || [];
        const gpu = doc.gpu_stats || [];
        const newest = [sys[sys.length - 1]?.timestamp, gpu[gpu.length - 1]?.timestamp].filter(Boolean).sort().pop();
        if (newest) last.current = newest;
        if (sys.length || gpu.length) {
          setSamples((old) => ({ sys: [...old.sys, ...sys].slice(-WINDOW), gpu: [...old.gpu, ...gpu].slice(-WINDOW * 8) }));
        }
      } catch (e) {
        if (live) setError(e);
      }
      if (live) timer = setTimeout(poll, every * 1000);
    };
    poll();
    return () => { live = false; clearTimeout(timer); };
  }, [every, enabled]);

  const system = useMemo(() => systemSeries(samples.sys), [samples.sys]);
  const gpus = useMemo(() => gpuSeries(samples.gpu), [samples.gpu]);

  if (enabled === false) {
    return html`<div class="page-head"><h1>Performance</h1></div>
      <div class="banner">The performance monitor is off on this server (<code>performance.disabled</code>), or this key may not read it.</div>`;
  }
  return html`
    <div class="page-head">
      <h1>Performance</h1><span class="muted small">experimental</span>
      <div class="actions">
        <label class="check">Refresh
          <select value=${every} onChange=${(e) => setEvery(parseInt(e.target.value, 10))} name="refresh">
            ${INTERVALS.map((n) => html`<option value=${n}>every ${n} s</option>`)}
          </select></label>
      </div>
    </div>
    <${ErrorNote} error=${error} />
    ${!samples.sys.length && html`<p class="muted" id="perf-waiting">Waiting for the first sample (the monitor samples every few seconds)…</p>`}
    ${samples.sys.length > 0 && html`
      <div class="charts" id="charts">
        <${Chart} id="chart-cpu" title="CPU" unit="%" min=${0} max=${100} series=${["average", "busiest core"]} data=${system.cpu} />
        <${Chart} id="chart-memory" title="Memory and swap" unit="%" min=${0} max=${100} series=${["memory", "swap"]} data=${system.memory} />
        <${Chart} id="chart-load" title="Load average" series=${["1 min", "5 min", "15 min"]} data=${system.load} />
        <${Chart} id="chart-network" title="Network" unit="Mbit/s" series=${["received", "sent"]} data=${system.network} />
      </div>`}
    ${gpus.labels.length > 0 && html`
      <h2 style="margin-top:1.2rem">GPUs</h2>
      <div class="charts" id="gpu-charts">
        <${Chart} id="chart-gpu-util" title="GPU utilisation" unit="%" min=${0} max=${100} series=${gpus.labels} data=${gpus.util} />
        <${Chart} id="chart-gpu-mem" title="GPU memory" unit="%" min=${0} max=${100} series=${gpus.labels} data=${gpus.mem} />
        <${Chart} id="chart-gpu-temp" title="GPU temperature" unit="°C" series=${gpus.labels} data=${gpus.temp} />
        ${gpus.hasVramTemp && html`<${Chart} id="chart-gpu-vram" title="VRAM temperature" unit="°C" series=${gpus.labels} data=${gpus.vram} />`}
        <${Chart} id="chart-gpu-power" title="GPU power" unit="W" series=${gpus.labels} data=${gpus.power} />
      </div>`}
    ${samples.sys.length > 0 && !gpus.labels.length && html`<p class="muted small" style="margin-top:1rem">No GPU samples (no NVML or nvidia-smi on this machine).</p>`}`;
}
