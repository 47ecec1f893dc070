// A time-series chart: one uPlot, created once, fed with setData (uPlot's own demos' shape).

import { html, useEffect, useRef } from "../lib.js";
import uPlot from "uplot";

const COLORS = ["#3b82f6", "#f97316", "#22c55e", "#e11d48", "#a855f7", "#14b8a6", "#eab308", "#64748b"];

function themeColors() {
  const css = getComputedStyle(document.documentElement);
  return { text: css.getPropertyValue("--muted").trim() || "#888", grid: css.getPropertyValue("--border").trim() || "#ccc" };
}

/**
 * ``data``: [xs (unix seconds), ys1, ys2, ...]; ``series``: labels for ys; ``unit`` for the y axis.
 */
export function Chart({ title, data, series, unit = "", min, max, id }) {
  const box = useRef(null);
  const plot = useRef(null);
  const key = series.join("\u0000");

  useEffect(() => {
    const colors = themeColors();
    const axis = { stroke: colors.text, grid: { stroke: colors.grid, width: 1 }, ticks: { stroke: colors.grid } };
    const width = Math.max(box.current.clientWidth, 200);
    const fmt = (v) => (v === null || v === undefined ? "–" : `${+v.toFixed(2)}${unit ? " " + unit : ""}`);
    const opts = {
      width,
      height: 200,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [min ?? Math.min(0, lo ?? 0), max ?? Math.max(hi ?? 1, 1)] } },
      axes: [{ ...axis }, { ...axis, size: 56, values: (u, vals) => vals.map((v) => `${+v.toFixed(1)}${unit === "%" ? "%" : ""}`) }],
      series: [{}, ...series.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, value: (u, v) => fmt(v) }))],
    };
    plot.current = new uPlot(opts, data, box.current);
    const resize = new ResizeObserver(() => {
      const w = Math.max(box.current?.clientWidth || 0, 200);
      if (plot.current && Math.abs(plot.current.width - w) > 2) plot.current.setSize({ width: w, height: 200 });
    });
    resize.observe(box.current);
    return () => { resize.disconnect(); plot.current.destroy(); plot.current = null; };
  }, [key, document.documentElement.dataset.theme]);

  useEffect(() => { if (plot.current) plot.current.setData(data); }, [data]);

  return html`<div class="card chart" id=${id}><h3>${title}</h3><div ref=${box}></div></div>`;
}
