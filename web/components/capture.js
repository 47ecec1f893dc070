// The capture viewer: /api/captures/<id> as pretty JSON, raw text, and the chat it carried.

import { html, useState } from "../lib.js";
import { api } from "../api.js";
import { Dialog, Tabs, CopyButton, useLoad, ErrorNote } from "./ui.js";
import { Markdown } from "./markdown.js";

export function decodeBody(b64) {
  if (b64 === null || b64 === undefined) return null;
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
}

function parseJSON(text) {
  if (!text) return undefined;
  try { return JSON.parse(text); } catch (e) { return undefined; }
}

/** The data: payloads of an SSE body (``[DONE]`` and non-JSON left out). */
export function sseEvents(text) {
  const out = [];
  for (const line of (text || "").split(/\r?\n/)) {
    if (!line.startsWith("data:")) continue;
    const payload = line.slice(5).trim();
    if (!payload || payload === "[DONE]") continue;
    const doc = parseJSON(payload);
    if (doc !== undefined) out.push(doc);
  }
  return out;
}

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => {
      if (typeof part === "string") return part;
      if (part.text) return part.text;
      if (part.type === "image_url" || part.type === "input_image" || part.type === "image") return "[image]";
      return "";
    }).join("");
  }
  return content === null || content === undefined ? "" : JSON.stringify(content);
}

/** The conversation a request sent: [{role, content}], or null when it is not a chat. */
export function requestMessages(body) {
  if (!body || typeof body !== "object") return null;
  const out = [];
  if (body.system) out.push({ role: "system", content: textOf(body.system) });
  if (body.instructions) out.push({ role: "system", content: textOf(body.instructions) });
  if (Array.isArray(body.messages)) {
    for (const m of body.messages) out.push({ role: m.role || "user", content: textOf(m.content) });
  } else if (typeof body.input === "string") {
    out.push({ role: "user", content: body.input });
  } else if (Array.isArray(body.input)) {
    for (const m of body.input) out.push({ role: m.role || "user", content: textOf(m.content ?? m.text) });
  } else if (typeof body.prompt === "string") {
    out.push({ role: "user", content: body.prompt });
  } else {
    return null;
  }
  return out;
}

/** One piece of streamed output: {content, reasoning} added by an SSE payload of any of the
 * APIs (OpenAI chat and completions, Responses, Anthropic messages, llama-server native). */
export function deltaOf(doc) {
  const out = { content: "", reasoning: "" };
  if (!doc || typeof doc !== "object") return out;
  const choice = Array.isArray(doc.choices) ? doc.choices[0] : null;
  if (choice) {
    const d = choice.delta || {};
    out.content += d.content || choice.text || "";
    out.reasoning += d.reasoning_content || d.reasoning || "";
  }
  switch (doc.type) {
    case "response.output_text.delta": out.content += doc.delta || ""; break;
    case "response.reasoning_text.delta":
    case "response.reasoning_summary_text.delta": out.reasoning += doc.delta || ""; break;
    case "content_block_delta":
      if (doc.delta?.type === "text_delta") out.content += doc.delta.text || "";
      if (doc.delta?.type === "thinking_delta") out.reasoning += doc.delta.thinking || "";
      break;
    default: break;
  }
  if (!choice && !doc.type && typeof doc.content === "string") out.content += doc.content;
  return out;
}

/** The reply of a whole (non-streamed) JSON response. */
export function replyOf(doc) {
  const out = { content: "", reasoning: "" };
  if (!doc || typeof doc !== "object") return out;
  const choice = Array.isArray(doc.choices) ? doc.choices[0] : null;
  if (choice) {
    out.content = textOf(choice.message?.content ?? choice.text ?? "");
    out.reasoning = choice.message?.reasoning_content || choice.message?.reasoning || "";
  } else if (Array.isArray(doc.output)) {
    for (const item of doc.output) {
      for (const part of item.content || []) {
        if (part.type === "output_text") out.content += part.text || "";
        if (part.type === "reasoning_text") out.reasoning += part.text || "";
      }
      if (item.type === "reasoning") out.reasoning += (item.summary || []).map((s) => s.text || "").join("");
    }
  } else if (Array.isArray(doc.content)) {
    for (const block of doc.content) {
      if (block.type === "text") out.content += block.text || "";
      if (block.type === "thinking") out.reasoning += block.thinking || "";
    }
  } else if (typeof doc.content === "string") {
    out.content = doc.content;
  }
  return out;
}

/** {messages, reply} recombined from a capture, or null if it is not a chat exchange. */
export function recombine(capture) {
  const reqText = decodeBody(capture.req_body);
  const respText = decodeBody(capture.resp_body);
  const messages = requestMessages(parseJSON(reqText));
  if (!messages) return null;
  let reply = { content: "", reasoning: "" };
  const type = Object.entries(capture.resp_headers || {}).find(([k]) => k.toLowerCase() === "content-type")?.[1] || "";
  if (type.includes("text/event-stream") || (respText || "").trimStart().startsWith("data:") || (respText || "").trimStart().startsWith("event:")) {
    for (const doc of sseEvents(respText)) {
      const d = deltaOf(doc);
      reply.content += d.content;
      reply.reasoning += d.reasoning;
    }
  } else {
    reply = replyOf(parseJSON(respText));
  }
  return { messages, reply };
}

export function conversationMarkdown(chat) {
  const parts = chat.messages.map((m) => `### ${m.role}\n\n${m.content}`);
  if (chat.reply.reasoning) parts.push(`### assistant (reasoning)\n\n${chat.reply.reasoning}`);
  parts.push(`### assistant\n\n${chat.reply.content}`);
  return parts.join("\n\n") + "\n";
}

function pretty(text) {
  const doc = parseJSON(text);
  if (doc !== undefined) return JSON.stringify(doc, null, 2);
  const events = sseEvents(text);
  if (events.length) return events.map((e) => JSON.stringify(e, null, 2)).join("\n");
  return text;
}

function Headers({ headers }) {
  const rows = Object.entries(headers || {});
  if (!rows.length) return html`<p class="muted small">No headers.</p>`;
  return html`<div class="table-wrap"><table><tbody>
    ${rows.map(([k, v]) => html`<tr><th>${k}</th><td class="mono">${Array.isArray(v) ? v.join(", ") : String(v)}</td></tr>`)}
  </tbody></table></div>`;
}

function Body({ text, raw }) {
  if (text === null) return html`<p class="muted small">Not captured for this path.</p>`;
  if (!text) return html`<p class="muted small">Empty.</p>`;
  return html`<pre class=${raw ? "raw" : "json"}>${raw ? text : pretty(text)}</pre>`;
}

function ChatView({ chat }) {
  return html`
    <div class="chat">
      ${chat.messages.map((m) => html`<div class=${"msg " + (m.role === "user" ? "user" : m.role === "system" ? "system" : "")}>
          <div class="role">${m.role}</div>${m.role === "assistant" ? html`<${Markdown} text=${m.content} />` : m.content}</div>`)}
      <div class="msg">
        <div class="role">assistant</div>
        ${chat.reply.reasoning && html`<details class="reasoning"><summary>Reasoning</summary><div class="text">${chat.reply.reasoning}</div></details>`}
        <${Markdown} text=${chat.reply.content} />
      </div>
    </div>`;
}

export function CaptureViewer({ id, onClose }) {
  const { data, error, loading } = useLoad(() => api.capture(id), [id]);
  const [view, setView] = useState("pretty");
  const chat = data ? recombine(data) : null;
  const req = data ? decodeBody(data.req_body) : null;
  const resp = data ? decodeBody(data.resp_body) : null;
  const tabs = [["pretty", "Pretty"], ["raw", "Raw"]];
  if (chat) tabs.push(["chat", "Chat"]);
  return html`
    <${Dialog} title=${`Capture #${id}`} onClose=${onClose}
               actions=${chat && html`<${CopyButton} text=${() => conversationMarkdown(chat)} label="Copy chat as markdown" />`}>
      ${loading && html`<p class="muted">Loading…</p>`}
      <${ErrorNote} error=${error} />
      ${data && html`
        <div class="capture" data-capture=${id}>
          <p class="mono small">${data.req_path}${data.key_name ? ` · key ${data.key_name}` : ""}</p>
          <${Tabs} tabs=${tabs} value=${view} onChange=${setView} label="Capture views" />
          ${view === "chat" && chat ? html`<${ChatView} chat=${chat} />` : html`
            <h3>Request</h3>
            <${Headers} headers=${data.req_headers} />
            <div style="margin-top:.5rem"><${Body} text=${req} raw=${view === "raw"} /></div>
            <h3 style="margin-top:1rem">Response</h3>
            <${Headers} headers=${data.resp_headers} />
            <div style="margin-top:.5rem"><${Body} text=${resp} raw=${view === "raw"} /></div>`}
        </div>`}
    <//>`;
}
