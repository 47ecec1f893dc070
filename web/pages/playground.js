// Playground: streaming chat with any model (three APIs), images, speech, transcription, rerank.
//
// The chat lives in this module, not in the page, so it goes on (and is still there) when
// another page is opened meanwhile.

import { html, useEffect, useRef, useState, useStored, num, bytes } from "../lib.js";
import { request, readSSE, postJSON, getJSON, errorMessage, ApiError } from "../api.js";
import { useStore } from "../events.js";
import { Tabs, ErrorNote, CopyButton } from "../components/ui.js";
import { Markdown } from "../components/markdown.js";
import { deltaOf, replyOf } from "../components/capture.js";
import { useModelRecords } from "./models.js";

/** A form's submit for one request: busy while it runs, then ``{...result}``
 * or ``{error}``.  ``work`` returns the result (or undefined to do nothing). */
function useSubmit() {
  const [result, setResult] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = (work) => async (e) => {
    e.preventDefault();
    setBusy(true);
    setResult(null);
    try {
      const value = await work();
      if (value !== undefined) setResult(value);
    } catch (err) {
      setResult({ error: err });
    } finally {
      setBusy(false);
    }
  };
  return { result, busy, submit };
}

export const ENDPOINTS = [
  ["/v1/chat/completions", "Chat completions (OpenAI)"],
  ["/v1/responses", "Responses (OpenAI)"],
  ["/v1/messages", "Messages (Anthropic)"],
];

// -- the chat's state, kept by the module ------------------------------------------------------

const chat = { messages: [], busy: false, controller: null };
const chatListeners = new Set();
window.addEventListener("pagehide", () => chat.controller?.abort()); // no stream kept by a left page
function chatChanged() { for (const fn of chatListeners) fn(); }

function useChat() {
  const [, force] = useState(0);
  useEffect(() => {
    const fn = () => force((n) => n + 1);
    chatListeners.add(fn);
    return () => chatListeners.delete(fn);
  }, []);
  return chat;
}

function requestBody(endpoint, settings, history) {
  const temperature = settings.temperature === "" ? undefined : Number(settings.temperature);
  const maxTokens = settings.maxTokens === "" ? undefined : parseInt(settings.maxTokens, 10);
  const turns = history.map((m) => ({ role: m.role, content: m.content }));
  if (endpoint === "/v1/responses") {
    return { model: settings.model, stream: true, input: turns, instructions: settings.system || undefined, temperature, max_output_tokens: maxTokens };
  }
  if (endpoint === "/v1/messages") {
    return { model: settings.model, stream: true, system: settings.system || undefined, messages: turns, temperature, max_tokens: maxTokens || 1024 };
  }
  const messages = settings.system ? [{ role: "system", content: settings.system }, ...turns] : turns;
  return { model: settings.model, stream: true, stream_options: { include_usage: true }, messages, temperature, max_tokens: maxTokens };
}

function usageOf(doc, stats) {
  const usage = doc.usage || doc.response?.usage || doc.message?.usage;
  if (usage) {
    const out = usage.completion_tokens ?? usage.output_tokens;
    const inp = usage.prompt_tokens ?? usage.input_tokens;
    if (out > 0) stats.outputTokens = out;
    if (inp > 0) stats.inputTokens = inp;
  }
  if (doc.timings) {
    if (doc.timings.predicted_per_second > 0) stats.serverTps = doc.timings.predicted_per_second;
    if (doc.timings.predicted_n > 0) stats.outputTokens = doc.timings.predicted_n;
    if (doc.timings.prompt_per_second > 0) stats.promptTps = doc.timings.prompt_per_second;
  }
}

function finishStats(reply) {
  const s = reply.stats;
  const decodeSeconds = s.firstAt && s.endAt ? (s.endAt - s.firstAt) / 1000 : 0;
  const tokensOut = s.outputTokens || s.chunks;
  s.tps = s.serverTps || (decodeSeconds > 0 && tokensOut > 1 ? (tokensOut - 1) / decodeSeconds : null);
  s.tokens = tokensOut;
}

async function send(text, settings) {
  const history = chat.messages.filter((m) => !m.error && (m.role === "user" || m.content)).map((m) => ({ role: m.role, content: m.content }));
  history.push({ role: "user", content: text });
  chat.messages = [...chat.messages, { role: "user", content: text }];
  const reply = { role: "assistant", content: "", reasoning: "", pending: true, model: settings.model, endpoint: settings.endpoint,
    stats: { startAt: performance.now(), firstAt: null, endAt: null, chunks: 0 } };
  chat.messages = [...chat.messages, reply];
  chat.busy = true;
  chat.controller = new AbortController();
  chatChanged();
  const update = () => { chat.messages = [...chat.messages]; chatChanged(); };
  try {
    const response = await request(settings.endpoint, { method: "POST", json: requestBody(settings.endpoint, settings, history), signal: chat.controller.signal });
    const type = response.headers.get("content-type") || "";
    if (type.includes("text/event-stream")) {
      await readSSE(response, (ev) => {
        if (ev.data === "[DONE]") return;
        let doc;
        try { doc = JSON.parse(ev.data); } catch (e) { return; }
        if (doc.error) throw new ApiError(200, errorMessage(200, ev.data));
        const d = deltaOf(doc);
        usageOf(doc, reply.stats);
        if (d.reasoning) reply.reasoning += d.reasoning;
        if (d.content) {
          if (!reply.stats.firstAt) reply.stats.firstAt = performance.now();
          reply.stats.chunks += 1;
          reply.content += d.content;
        }
        if (d.content || d.reasoning) update();
      }, chat.controller.signal);
    } else {
      const doc = await response.json();
      const r = replyOf(doc);
      reply.content = r.content;
      reply.reasoning = r.reasoning;
      reply.stats.firstAt = performance.now();
      usageOf(doc, reply.stats);
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message || String(e);
  } finally {
    reply.pending = false;
    reply.stats.endAt = performance.now();
    finishStats(reply);
    chat.busy = false;
    chat.controller = null;
    update();
  }
}

// -- chat view -------------------------------------------------------------------------------------

function ModelSelect({ value, onChange, records, name = "model" }) {
  const ids = (records || []).map((r) => r.id);
  useEffect(() => { if (ids.length && !ids.includes(value)) onChange(ids[0]); }, [ids.join(","), value]);
  return html`<label class="field"><span>Model</span>
    <select name=${name} value=${value} onChange=${(e) => onChange(e.target.value)}>
      ${ids.map((id) => html`<option value=${id}>${id}</option>`)}
    </select></label>`;
}

function Reply({ m }) {
  const modelState = useStore((s) => (s.models || []).find((x) => x.id === m.model)?.state);
  const waiting = m.pending && !m.content;
  const loadingModel = waiting && modelState && modelState !== "ready";
  const s = m.stats;
  return html`
    <div class="msg assistant" data-pending=${m.pending ? "true" : "false"}>
      <div class="role">assistant · ${m.model}</div>
      ${m.reasoning && html`<details class="reasoning" open=${m.pending && !m.content}><summary>Reasoning</summary><div class="text">${m.reasoning}</div></details>`}
      ${waiting && html`<div class="loading" role="status">${html`<span class="spinner"></span>`}${loadingModel ? `Loading ${m.model}…` : "Waiting for the reply…"}</div>`}
      ${m.content && html`<${Markdown} text=${m.content} />`}
      ${m.error && html`<p class="error">${m.error}</p>`}
      ${!m.pending && !m.error && html`<div class="meta" data-stats="true">
        ${m.stopped ? "stopped · " : ""}${num(s.tokens || 0)} tokens
        ${s.tps ? html` · <span class="tps">${s.tps.toFixed(1)} tokens/s</span>` : ""}
        ${s.firstAt ? ` · first token after ${((s.firstAt - s.startAt) / 1000).toFixed(2)} s` : ""}
        ${m.content && html` · <${CopyButton} text=${m.content} className="link small" />`}
      </div>`}
    </div>`;
}

function ChatTab({ records }) {
  const state = useChat();
  const [model, setModel] = useStored("playground.model", "");
  const [endpoint, setEndpoint] = useStored("playground.endpoint", ENDPOINTS[0][0]);
  const [system, setSystem] = useStored("playground.system", "");
  const [temperature, setTemperature] = useStored("playground.temperature", "0.7");
  const [maxTokens, setMaxTokens] = useStored("playground.maxTokens", "");
  const [text, setText] = useState("");
  const end = useRef(null);
  useEffect(() => { if (state.messages.length) end.current?.scrollIntoView({ block: "end" }); }, [state.messages]);
  const submit = (e) => {
    e.preventDefault();
    const t = text.trim();
    if (!t || state.busy || !model) return;
    setText("");
    send(t, { model, endpoint, system, temperature, maxTokens });
  };
  const onKey = (e) => { if (e.key === "Enter" && !e.shiftKey) submit(e); };
  return html`
    <div class="playground">
      <div class="card">
        <${ModelSelect} value=${model} onChange=${setModel} records=${records} />
        <label class="field"><span>API</span>
          <select name="endpoint" value=${endpoint} onChange=${(e) => setEndpoint(e.target.value)}>
            ${ENDPOINTS.map(([path, label]) => html`<option value=${path}>${label}</option>`)}
          </select></label>
        <label class="field"><span>System prompt</span>
          <textarea name="system" rows="4" value=${system} onInput=${(e) => setSystem(e.target.value)} placeholder="You are a helpful assistant."></textarea></label>
        <div class="field"><label for="temperature"><span class="small muted"><strong>Temperature ${temperature === "" ? "(model default)" : temperature}</strong></span></label>
          <input id="temperature" type="range" min="0" max="2" step="0.05" value=${temperature === "" ? 0.7 : temperature} onInput=${(e) => setTemperature(e.target.value)} />
          <div class="row" style="gap:.3rem">${[["Precise", "0.2"], ["Balanced", "0.7"], ["Creative", "1.2"], ["Default", ""]].map(([l, v]) => html`
            <button type="button" class="small" aria-pressed=${temperature === v ? "true" : "false"} onClick=${() => setTemperature(v)}>${l}</button>`)}</div>
        </div>
        <label class="field"><span>Max tokens</span>
          <input type="number" min="1" name="max_tokens" placeholder="model default" value=${maxTokens} onInput=${(e) => setMaxTokens(e.target.value)} /></label>
        <button type="button" onClick=${() => { if (!state.busy) { chat.messages = []; chatChanged(); } }} disabled=${state.busy || !state.messages.length}>Clear conversation</button>
      </div>
      <div>
        <div class="chat" id="chat" aria-live="polite">
          ${!state.messages.length && html`<p class="muted">Pick a model and say something. Replies stream in; a model that is not loaded is started first.</p>`}
          ${state.messages.map((m) => (m.role === "user" ? html`<div class="msg user"><div class="role">you</div>${m.content}</div>` : html`<${Reply} m=${m} />`))}
          <div ref=${end}></div>
        </div>
        <form class="composer" onSubmit=${submit}>
          <textarea name="prompt" aria-label="Message" placeholder="Message (Enter sends, Shift+Enter for a new line)" value=${text}
                    onInput=${(e) => setText(e.target.value)} onKeyDown=${onKey}></textarea>
          ${state.busy ? html`<button type="button" class="danger" onClick=${() => chat.controller?.abort()}>Stop</button>`
            : html`<button type="submit" class="primary" id="send" disabled=${!model}>Send</button>`}
        </form>
      </div>
    </div>`;
}

// -- images ---------------------------------------------------------------------------------------------

const SIZES = ["512x512", "768x768", "1024x1024", "1024x768", "768x1024", "1280x720"];

function ImagesTab({ records }) {
  const [model, setModel] = useStored("playground.images.model", "");
  const [api, setApi] = useStored("playground.images.api", "openai");
  const [prompt, setPrompt] = useState("");
  const [negative, setNegative] = useState("");
  const [size, setSize] = useStored("playground.images.size", "512x512");
  const [steps, setSteps] = useState("20");
  const [cfg, setCfg] = useState("7");
  const [sampler, setSampler] = useState("");
  const [count, setCount] = useState("1");
  const [loras, setLoras] = useState([]);
  const { result, busy, submit } = useSubmit();
  useEffect(() => {
    setLoras([]);
    if (api !== "sdapi" || !model) return;
    getJSON(`/sdapi/v1/loras?model=${encodeURIComponent(model)}`).then((doc) => setLoras(Array.isArray(doc) ? doc : doc.loras || []), () => setLoras([]));
  }, [api, model]);
  const run = submit(async () => {
    const [width, height] = size.split("x").map(Number);
    if (api === "sdapi") {
      const doc = await postJSON("/sdapi/v1/txt2img", { model, prompt, negative_prompt: negative || undefined, width, height,
        steps: Number(steps), cfg_scale: Number(cfg), sampler_name: sampler || undefined, batch_size: Number(count) });
      return { images: (doc.images || []).map((b64) => `data:image/png;base64,${b64}`), doc };
    }
    const doc = await postJSON("/v1/images/generations", { model, prompt, n: Number(count), size, response_format: "b64_json" });
    return { images: (doc.data || []).map((d) => (d.b64_json ? `data:image/png;base64,${d.b64_json}` : d.url)).filter(Boolean), doc };
  });
  return html`
    <form class="playground" onSubmit=${run}>
      <div class="card">
        <${ModelSelect} value=${model} onChange=${setModel} records=${records} />
        <label class="field"><span>API</span><select name="images_api" value=${api} onChange=${(e) => setApi(e.target.value)}>
          <option value="openai">OpenAI /v1/images/generations</option><option value="sdapi">SDAPI /sdapi/v1/txt2img</option></select></label>
        <label class="field"><span>Size</span><select value=${size} onChange=${(e) => setSize(e.target.value)}>${SIZES.map((s) => html`<option>${s}</option>`)}</select></label>
        <label class="field"><span>${api === "sdapi" ? "Batch size" : "Images"}</span><input type="number" min="1" max="8" value=${count} onInput=${(e) => setCount(e.target.value)} /></label>
        ${api === "sdapi" && html`
          <div class="row">
            <label class="field"><span>Steps</span><input type="number" min="1" value=${steps} onInput=${(e) => setSteps(e.target.value)} /></label>
            <label class="field"><span>CFG</span><input type="number" min="0" step="0.5" value=${cfg} onInput=${(e) => setCfg(e.target.value)} /></label>
          </div>
          <label class="field"><span>Sampler</span><input value=${sampler} placeholder="default" onInput=${(e) => setSampler(e.target.value)} /></label>
          ${loras.length > 0 && html`<div class="field"><span>LoRAs (click to add)</span><div>${loras.map((l) => {
            const name = typeof l === "string" ? l : l.name || l.alias;
            return html`<button type="button" class="small" onClick=${() => setPrompt((p) => `${p} <lora:${name}:1>`.trim())}>${name}</button> `;
          })}</div></div>`}`}
      </div>
      <div>
        <label class="field"><span>Prompt</span><textarea name="image_prompt" rows="3" value=${prompt} onInput=${(e) => setPrompt(e.target.value)} required></textarea></label>
        ${api === "sdapi" && html`<label class="field"><span>Negative prompt</span><textarea rows="2" value=${negative} onInput=${(e) => setNegative(e.target.value)}></textarea></label>`}
        <button type="submit" class="primary" disabled=${busy || !model}>${busy ? "Generating…" : "Generate"}</button>
        ${result?.error && html`<${ErrorNote} error=${result.error} />`}
        ${result?.images && html`
          <div style="margin-top:1rem">
            ${result.images.length ? html`<div class="images">${result.images.map((src, i) => html`<a href=${src} download=${`image-${i + 1}.png`}><img src=${src} alt=${`Generated image ${i + 1}`} /></a>`)}</div>`
              : html`<p class="muted">No images in the answer:</p><pre class="json">${JSON.stringify(result.doc, null, 2)}</pre>`}
          </div>`}
      </div>
    </form>`;
}

// -- speech and transcription ------------------------------------------------------------------------------

function SpeechTab({ records }) {
  const [model, setModel] = useStored("playground.speech.model", "");
  const [voices, setVoices] = useState([]);
  const [voice, setVoice] = useState("");
  const [format, setFormat] = useState("mp3");
  const [input, setInput] = useState("");
  const { result, busy, submit } = useSubmit();
  useEffect(() => {
    setVoices([]);
    if (!model) return;
    getJSON(`/v1/audio/voices?model=${encodeURIComponent(model)}`).then((doc) => {
      const list = (doc.voices || doc.data || []).map((v) => (typeof v === "string" ? v : v.id || v.name));
      setVoices(list);
      if (list.length) setVoice(list[0]);
    }, () => setVoices([]));
  }, [model]);
  useEffect(() => () => { if (result?.url) URL.revokeObjectURL(result.url); }, [result]);
  const run = submit(async () => {
    const response = await request("/v1/audio/speech", { method: "POST", json: { model, input, voice: voice || undefined, response_format: format } });
    const type = response.headers.get("content-type") || "";
    if (type.startsWith("audio/") || type === "application/octet-stream") {
      const blob = await response.blob();
      return { url: URL.createObjectURL(blob), size: blob.size, type };
    }
    return { text: await response.text(), type };
  });
  return html`
    <form class="playground" onSubmit=${run}>
      <div class="card">
        <${ModelSelect} value=${model} onChange=${setModel} records=${records} />
        <label class="field"><span>Voice</span>${voices.length
          ? html`<select value=${voice} onChange=${(e) => setVoice(e.target.value)}>${voices.map((v) => html`<option>${v}</option>`)}</select>`
          : html`<input value=${voice} placeholder="default" onInput=${(e) => setVoice(e.target.value)} />`}</label>
        <label class="field"><span>Format</span><select value=${format} onChange=${(e) => setFormat(e.target.value)}>
          ${["mp3", "wav", "opus", "flac"].map((f) => html`<option>${f}</option>`)}</select></label>
      </div>
      <div>
        <label class="field"><span>Text</span><textarea name="speech_input" rows="4" value=${input} onInput=${(e) => setInput(e.target.value)} required></textarea></label>
        <button type="submit" class="primary" disabled=${busy || !model}>${busy ? "Speaking…" : "Speak"}</button>
        ${result?.error && html`<${ErrorNote} error=${result.error} />`}
        ${result?.url && html`<div style="margin-top:1rem"><audio controls src=${result.url}></audio>
          <p class="small muted">${result.type}, ${bytes(result.size)} · <a href=${result.url} download=${`speech.${format}`}>Download</a></p></div>`}
        ${result?.text !== undefined && html`<p class="muted small" style="margin-top:1rem">The server answered ${result.type || "without audio"}:</p><pre class="raw">${result.text}</pre>`}
      </div>
    </form>`;
}

function TranscriptionTab({ records }) {
  const [model, setModel] = useStored("playground.transcription.model", "");
  const [file, setFile] = useState(null);
  const [language, setLanguage] = useState("");
  const [over, setOver] = useState(false);
  const { result, busy, submit } = useSubmit();
  const onDrop = (e) => {
    e.preventDefault();
    setOver(false);
    if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
  };
  const run = submit(async () => {
    if (!file) return undefined;
    const form = new FormData();
    form.append("model", model);
    form.append("file", file, file.name);
    if (language) form.append("language", language);
    const response = await request("/v1/audio/transcriptions", { method: "POST", body: form });
    const text = await response.text();
    let doc = null;
    try { doc = JSON.parse(text); } catch (err) { doc = null; }
    return { text: doc?.text ?? text, doc };
  });
  return html`
    <form class="playground" onSubmit=${run}>
      <div class="card">
        <${ModelSelect} value=${model} onChange=${setModel} records=${records} />
        <label class="field"><span>Language (optional)</span><input value=${language} placeholder="en" onInput=${(e) => setLanguage(e.target.value)} /></label>
      </div>
      <div>
        <div class=${"dropzone" + (over ? " over" : "")} onDragOver=${(e) => { e.preventDefault(); setOver(true); }}
             onDragLeave=${() => setOver(false)} onDrop=${onDrop}>
          <p>${file ? html`<strong>${file.name}</strong> (${bytes(file.size)})` : "Drop an audio file here, or choose one:"}</p>
          <input type="file" accept="audio/*,video/*" name="audio_file" aria-label="Audio file" onChange=${(e) => setFile(e.target.files[0] || null)} />
        </div>
        <button type="submit" class="primary" style="margin-top:.8rem" disabled=${busy || !file || !model}>${busy ? "Transcribing…" : "Transcribe"}</button>
        ${result?.error && html`<${ErrorNote} error=${result.error} />`}
        ${result?.text !== undefined && html`<div class="card" style="margin-top:1rem"><h3>Transcript</h3><p id="transcript">${result.text}</p>
          ${result.doc && html`<details><summary class="small">JSON</summary><pre class="json">${JSON.stringify(result.doc, null, 2)}</pre></details>`}</div>`}
      </div>
    </form>`;
}

// -- rerank ---------------------------------------------------------------------------------------------------

function RerankTab({ records }) {
  const [model, setModel] = useStored("playground.rerank.model", "");
  const [query, setQuery] = useState("");
  const [documents, setDocuments] = useState("");
  const [topN, setTopN] = useState("");
  const [view, setView] = useState("table");
  const { result, busy, submit } = useSubmit();
  const docs = documents.split("\n").map((d) => d.trim()).filter(Boolean);
  const run = submit(async () => ({
    doc: await postJSON("/v1/rerank", { model, query, documents: docs, top_n: topN ? Number(topN) : undefined }),
  }));
  const results = (result?.doc?.results || []).slice().sort((a, b) => (b.relevance_score ?? 0) - (a.relevance_score ?? 0));
  return html`
    <form class="playground" onSubmit=${run}>
      <div class="card">
        <${ModelSelect} value=${model} onChange=${setModel} records=${records} />
        <label class="field"><span>Top N (optional)</span><input type="number" min="1" value=${topN} onInput=${(e) => setTopN(e.target.value)} /></label>
      </div>
      <div>
        <label class="field"><span>Query</span><input name="rerank_query" value=${query} onInput=${(e) => setQuery(e.target.value)} required /></label>
        <label class="field"><span>Documents (one per line)</span><textarea name="rerank_documents" rows="6" value=${documents} onInput=${(e) => setDocuments(e.target.value)} required></textarea></label>
        <button type="submit" class="primary" disabled=${busy || !model || !docs.length}>${busy ? "Ranking…" : "Rerank"}</button>
        ${result?.error && html`<${ErrorNote} error=${result.error} />`}
        ${result?.doc && html`<div style="margin-top:1rem">
          <${Tabs} tabs=${[["table", "Table"], ["json", "JSON"]]} value=${view} onChange=${setView} label="Rerank views" />
          ${view === "json" || !results.length ? html`<pre class="json">${JSON.stringify(result.doc, null, 2)}</pre>` : html`
            <div class="table-wrap"><table><thead><tr><th class="num">Rank</th><th class="num">Index</th><th class="num">Score</th><th>Document</th></tr></thead><tbody>
              ${results.map((r, i) => html`<tr><td class="num">${i + 1}</td><td class="num">${r.index}</td><td class="num">${(r.relevance_score ?? 0).toFixed(4)}</td>
                <td>${typeof r.document === "string" ? r.document : r.document?.text ?? docs[r.index] ?? ""}</td></tr>`)}
            </tbody></table></div>`}
        </div>`}
      </div>
    </form>`;
}

// -- the page ----------------------------------------------------------------------------------------------------

export function PlaygroundPage() {
  const [tab, setTab] = useStored("playground.tab", "chat");
  const ids = useStore((s) => (s.models ? s.models.map((m) => m.id).join(",") : ""));
  const { data: records, error } = useModelRecords(ids);
  const usable = (records || []).filter((r) => r.meta?.llamaswap?.type !== "alias");
  return html`
    <div class="page-head"><h1>Playground</h1></div>
    <${ErrorNote} error=${error} />
    <${Tabs} tabs=${[["chat", "Chat"], ["images", "Images"], ["speech", "Speech"], ["transcription", "Transcription"], ["rerank", "Rerank"]]}
             value=${tab} onChange=${setTab} label="Playground" />
    ${tab === "chat" && html`<${ChatTab} records=${usable} />`}
    ${tab === "images" && html`<${ImagesTab} records=${usable} />`}
    ${tab === "speech" && html`<${SpeechTab} records=${usable} />`}
    ${tab === "transcription" && html`<${TranscriptionTab} records=${usable} />`}
    ${tab === "rerank" && html`<${RerankTab} records=${usable} />`}`;
}

