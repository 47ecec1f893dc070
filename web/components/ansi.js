// ANSI colours (SGR escape sequences) in log text, as Preact nodes.

import { html } from "../lib.js";

const SGR = /\x1b\[([0-9;]*)m|\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g;

function palette256(n) {
  if (n < 16) return null;
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v},${v},${v})`;
  }
  const i = n - 16;
  const c = (x) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${c(Math.floor(i / 36))},${c(Math.floor(i / 6) % 6)},${c(i % 6)})`;
}

function apply(style, codes) {
  const next = { ...style };
  for (let i = 0; i < codes.length; i += 1) {
    const c = codes[i];
    if (c === 0) { Object.keys(next).forEach((k) => delete next[k]); }
    else if (c === 1) next.bold = true;
    else if (c === 2) next.dim = true;
    else if (c === 3) next.italic = true;
    else if (c === 4) next.underline = true;
    else if (c === 22) { delete next.bold; delete next.dim; }
    else if (c === 23) delete next.italic;
    else if (c === 24) delete next.underline;
    else if (c >= 30 && c <= 37) { next.fg = c - 30; delete next.fgRgb; }
    else if (c >= 90 && c <= 97) { next.fg = c - 90 + 8; delete next.fgRgb; }
    else if (c === 39) { delete next.fg; delete next.fgRgb; }
    else if (c >= 40 && c <= 47) { next.bg = c - 40; delete next.bgRgb; }
    else if (c >= 100 && c <= 107) { next.bg = c - 100; delete next.bgRgb; }
    else if (c === 49) { delete next.bg; delete next.bgRgb; }
    else if ((c === 38 || c === 48) && codes[i + 1] === 5) {
      const n = codes[i + 2];
      const rgb = palette256(n);
      const key = c === 38 ? "fg" : "bg";
      if (rgb) { next[key + "Rgb"] = rgb; delete next[key]; } else { next[key] = n; delete next[key + "Rgb"]; }
      i += 2;
    } else if ((c === 38 || c === 48) && codes[i + 1] === 2) {
      const key = c === 38 ? "fgRgb" : "bgRgb";
      next[key] = `rgb(${codes[i + 2] | 0},${codes[i + 3] | 0},${codes[i + 4] | 0})`;
      delete next[c === 38 ? "fg" : "bg"];
      i += 4;
    }
  }
  return next;
}

function span(text, style, key) {
  const classes = [];
  if (style.bold) classes.push("ansi-bold");
  if (style.dim) classes.push("ansi-dim");
  if (style.italic) classes.push("ansi-italic");
  if (style.underline) classes.push("ansi-underline");
  if (style.fg !== undefined) classes.push("ansi-fg-" + (style.fg % 16));
  if (style.bg !== undefined) classes.push("ansi-bg-" + (style.bg % 8));
  const css = [style.fgRgb ? `color:${style.fgRgb}` : "", style.bgRgb ? `background:${style.bgRgb}` : ""].filter(Boolean).join(";");
  if (!classes.length && !css) return text;
  return html`<span key=${key} class=${classes.join(" ") || undefined} style=${css || undefined}>${text}</span>`;
}

/** ``text`` with its colour codes rendered and every other escape sequence dropped.  Each
 * line starts plain: logs of several processes interleave, and one that leaves a colour on
 * must not paint the others' lines. */
export function ansi(text) {
  const out = [];
  const push = (piece) => { // plain text next to plain text: one text node
    if (typeof piece === "string" && typeof out[out.length - 1] === "string") out[out.length - 1] += piece;
    else out.push(piece);
  };
  const lines = text.split("\n");
  lines.forEach((line, n) => {
    let style = {};
    let last = 0;
    let match;
    SGR.lastIndex = 0;
    while ((match = SGR.exec(line)) !== null) {
      if (match.index > last) push(span(line.slice(last, match.index), style, out.length));
      if (match[1] !== undefined) {
        const codes = match[1] === "" ? [0] : match[1].split(";").map((x) => parseInt(x || "0", 10));
        style = apply(style, codes);
      }
      last = SGR.lastIndex;
    }
    const rest = line.slice(last) + (n < lines.length - 1 ? "\n" : "");
    if (rest) push(span(rest, style, out.length));
  });
  return out;
}
