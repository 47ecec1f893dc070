// Markdown (assistant replies, captures): marked, then DOMPurify.

import { html, useMemo } from "../lib.js";
import { marked } from "marked";
import DOMPurify from "dompurify";

marked.setOptions({ gfm: true, breaks: false });

export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text || ""));
}

export function Markdown({ text }) {
  const rendered = useMemo(() => renderMarkdown(text), [text]);
  return html`<div class="md" dangerouslySetInnerHTML=${{ __html: rendered }}></div>`;
}
