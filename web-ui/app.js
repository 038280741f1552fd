// Hearth's web UI: the cluster (devices, layer ranges, load/unload), a
// streaming chat over the OpenAI-compatible API, and the events log.
// Plain DOM, no dependencies: the node serves this file itself, offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("hearth-key") || "",
  view: null,
  nodeState: {}, // node id -> {text, cls}
  plan: null, // the last planned placement (from events)
  loading: null,
  chat: [],
  abort: null,
};

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, opts = {}) {
  const r = await fetch(path, {
    method: opts.method || "GET",
    headers: headers(opts.body !== undefined),
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
    signal: opts.signal,
  });
  if (r.status === 401) {
    $("keybar").hidden = false;
    throw new Error("this node needs an API key");
  }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

const fmtBytes = (b) => (b >= 1e9 ? (b / 1e9).toFixed(1) + " GB" : (b / 1e6).toFixed(0) + " MB");
const fmtTime = (ms) => new Date(ms).toLocaleTimeString();
const short = (id) => String(id || "").slice(0, 8);

// ---------------------------------------------------------------- tabs
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => show(b.dataset.page));
}
function show(page) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.page === page);
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + page;
  if (page === "chat") refreshChatModels();
}

$("savekey").addEventListener("click", () => {
  state.key = $("apikey").value.trim();
  localStorage.setItem("hearth-key", state.key);
  $("keybar").hidden = true;
  refresh();
  listenEvents();
});

// ------------------------------------------------------------- cluster
async function refresh() {
  try {
    const view = await (await api("/api/cluster")).json();
    state.view = view;
    $("conn").textContent = view.members.length + " node(s)";
    $("conn").className = "pill ok";
    renderCluster();
  } catch (e) {
    $("conn").textContent = "offline: " + e.message;
    $("conn").className = "pill bad";
  }
}

async function refreshModels() {
  try {
    const m = await (await api("/api/models")).json();
    const pick = $("model-pick");
    const current = pick.value;
    pick.replaceChildren(...m.available.map((x) =>
      el("option", { value: x.name, text: x.name + (x.download ? " (download)" : x.size_bytes ? " · " + fmtBytes(x.size_bytes) : "") +
        (x.adapter ? " · LoRA of " + x.adapter.base_model : "") +
        (x.holders && x.holders.length && !x.holders.includes(m.node) ? " · on " + x.holders.join(", ") : "") })));
    const has = (v) => m.available.some((x) => x.name === v);
    if (current && has(current)) pick.value = current;
    else if (m.loaded && has(m.loaded)) pick.value = m.loaded;
  } catch (_) { /* shown by refresh */ }
}

function totalLayers(p) {
  return p && p.stages.length ? p.stages[p.stages.length - 1].spec.end : 0;
}

function renderCluster() {
  const v = state.view;
  const p = v.placement;
  const total = totalLayers(p);
  if (p) {
    const reps = p.replicas || [];
    $("serving").textContent = `Serving ${p.model} in ${p.stages.length} stage(s) over ${total} layers` +
      (reps.length ? ` + ${reps.length} whole-model replica(s) (${reps.map((r) => r.name).join(", ")})` : "") +
      (p.predicted_tokens_per_s ? ` · predicted ${p.predicted_tokens_per_s.toFixed(1)} tok/s` :
        p.predicted_step_s ? ` · predicted ${(1 / p.predicted_step_s).toFixed(1)} tok/s per stream` : "") +
      (v.predicted_now ? ` (${v.predicted_now.tokens_per_s.toFixed(1)} tok/s with the current figures)` : "") +
      (p.reason ? ` · placed because ${p.reason}` : "");
  } else if (state.loading) {
    $("serving").textContent = `Loading ${state.loading}…`;
  } else {
    $("serving").textContent = "No model placed. Pick one and load it across the cluster.";
  }
  renderPlan(state.plan || p);
  const profiles = new Map(((v.profiles && v.profiles.nodes) || []).map((n) => [n.node_id, n]));
  const names = new Map(v.members.map((m) => [m.node_id, m.name]));
  const cards = v.members.map((m) => {
    const prof = profiles.get(m.node_id);
    const hw = prof && prof.hardware;
    const stageIdx = p ? p.stages.findIndex((s) => s.node_id === m.node_id) : -1;
    const replica = p && p.replicas ? p.replicas.find((r) => r.node_id === m.node_id) : null;
    const stage = stageIdx >= 0 ? p.stages[stageIdx] :
      replica ? { spec: { start: 0, end: total, embed: true, head: true } } : null;
    const layerBar = el("div", { class: "bar layers", "data-testid": "layers" });
    if (stage && total) {
      const seg = el("span");
      seg.style.left = (100 * stage.spec.start / total) + "%";
      seg.style.width = (100 * (stage.spec.end - stage.spec.start) / total) + "%";
      seg.style.background = `var(--stage-${stageIdx >= 0 ? stageIdx % 4 : 3})`;
      layerBar.append(seg);
    }
    const layerText = replica ? `replica: all ${total} layers, takes requests when that adds speed` :
      stage ? `layers ${stage.spec.start}–${stage.spec.end - 1} of ${total}` +
      (stage.spec.embed ? " · embedding" : "") + (stage.spec.head ? " · head" : "") : "no layers";
    layerBar.append(el("em", { text: layerText }));
    const memBar = el("div", { class: "bar mem" });
    if (hw) {
      const used = hw.total_memory - hw.available_memory;
      const fill = el("span");
      fill.style.width = (100 * used / Math.max(1, hw.total_memory)) + "%";
      memBar.append(fill, el("em", { text: `${fmtBytes(used)} used of ${fmtBytes(hw.total_memory)}` }));
    }
    const t = prof && prof.model;
    const speed = t ? `${(t.layer.decode_s * 1e3).toFixed(3)} ms per layer per token (${t.backend}, ${t.threads} threads)` : "not measured yet";
    const links = ((prof && prof.links) || []).map((l) =>
      `${names.get(l.peer) || short(l.peer)}: ${(l.bandwidth_bytes_per_s * 8 / 1e9).toFixed(2)} Gbit/s, ${l.rtt_ms.toFixed(2)} ms`);
    const gpus = hw && hw.gpus.length ? hw.gpus.map((g) => `${g.name} (${g.backend})`).join(", ") : "none";
    // What the machine offers now (quota, other programs' load) and what
    // the stages do, from the node's live figures.
    const o = prof && prof.offer;
    const offer = o ? `${(o.quota_cores != null ? Math.min(o.cpus, o.quota_cores) : o.cpus).toFixed(2)} cores offered` +
      (o.quota_cores != null ? ` (quota ${o.quota_cores.toFixed(2)})` : "") +
      ` · other programs ${o.others_load.toFixed(2)} cores` : "…";
    const lv = prof && prof.live;
    const live = lv ? `${Math.round(100 * lv.busy)}% busy · ${lv.tokens_per_s.toFixed(1)} tok/s · ` +
      `${lv.factor.toFixed(2)}× start-up time${lv.trusted ? "" : " (few samples)"}` : "idle";
    const fig = p && p.figures ? p.figures.find((f) => f.node_id === m.node_id) : null;
    const planned = fig ? `${(fig.layer_decode_s * 1e3).toFixed(3)} ms/layer (${fig.source} figures` +
      (fig.cores != null ? `, ${fig.cores.toFixed(2)} cores` : "") + ")" : "not in the plan's input";
    const st = state.nodeState[m.node_id];
    const ready = stage && !st ? { text: "ready", cls: "ready" } : st;
    return el("article", { class: "card device", "data-node": m.name },
      el("h3", {}, el("span", { text: m.name }),
        m.leader ? el("span", { class: "badge leader", text: "leader" }) : null,
        m.state === "self" ? el("span", { class: "badge", text: "this node" }) : null,
        el("span", { class: "badge", text: short(m.node_id) })),
      el("dl", {},
        el("dt", { text: "CPU" }), el("dd", { text: hw ? `${hw.cpu} · ${hw.physical_cores}/${hw.logical_cores} cores · ${hw.arch}` : "…" }),
        el("dt", { text: "GPU" }), el("dd", { text: gpus }),
        el("dt", { text: "Speed" }), el("dd", { text: speed }),
        el("dt", { text: "Offer" }), el("dd", { "data-testid": "offer", text: offer }),
        el("dt", { text: "Live" }), el("dd", { "data-testid": "live", text: live }),
        el("dt", { text: "Planned" }), el("dd", { "data-testid": "planned", text: planned }),
        el("dt", { text: "Links" }), el("dd", { text: links.length ? links.join(" · ") : (m.state === "self" ? "—" : `heartbeat rtt ${m.rtt_ms ? m.rtt_ms.toFixed(2) + " ms" : "…"}`) })),
      el("div", { class: "muted", text: "Memory" }), memBar,
      el("div", { class: "muted", text: "Layers" }), layerBar,
      ready ? el("div", { class: "state " + ready.cls, "data-testid": "node-state", text: ready.text }) : null);
  });
  $("devices").replaceChildren(...cards);
}

function renderPlan(p) {
  if (!p) { $("plan").replaceChildren(); return; }
  const rows = p.stages.map((s, i) => el("tr", {},
    el("td", { text: String(i) }), el("td", { text: s.name }),
    el("td", { text: `${s.spec.start}–${s.spec.end - 1}` }),
    el("td", { text: (s.spec.embed ? "embedding " : "") + (s.spec.head ? "head" : "") })));
  $("plan").replaceChildren(el("table", {},
    el("thead", {}, el("tr", {}, ...["stage", "node", "layers", "also"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows)));
}

$("load").addEventListener("click", async () => {
  const model = $("model-pick").value;
  if (!model) return;
  state.loading = model;
  state.plan = null;
  state.nodeState = {};
  try {
    const r = await (await api("/api/models/load", { method: "POST", body: { model } })).json();
    for (const x of r.refused) addEvent({ at_ms: Date.now(), node: x.node, kind: "model_failed", model, reason: x.reason });
  } catch (e) {
    state.loading = null;
    alert("Cannot load: " + e.message);
  }
  refresh();
});

$("unload").addEventListener("click", async () => {
  try { await api("/api/models/unload", { method: "POST", body: {} }); } catch (e) { alert(e.message); }
  state.plan = null;
  state.nodeState = {};
  refresh();
});

// -------------------------------------------------------------- events
function describe(e) {
  switch (e.kind) {
    case "member_joined": return `${e.node} joined from ${e.address}`;
    case "member_left": return `${e.node} left: ${e.reason}`;
    case "leader_changed": return `leader is now ${short(e.leader)}`;
    case "model_loading": return `${e.node} is fetching and measuring ${e.model}`;
    case "model_loaded": return `${e.node} serves ${e.model} (${e.layer_decode_ms.toFixed(3)} ms per layer per token)`;
    case "model_failed": return `${e.node} cannot load ${e.model}: ${e.reason}`;
    case "model_unloaded": return `${e.node} unloaded ${e.model}`;
    case "placement_planned": return `plan: ${e.placement.stages.map((s) => `${s.name} ${s.spec.start}..${s.spec.end}`).join(" → ")}` +
      (e.placement.reason ? ` — ${e.placement.reason}` : "");
    case "stage_loading": return `${e.node} is loading layers ${e.start}..${e.end}`;
    case "stage_loaded": return `${e.node} loaded layers ${e.start}..${e.end} in ${e.secs.toFixed(2)} s`;
    case "stage_failed": return `${e.node} failed to load its stage: ${e.reason}`;
    case "placement_active": return `serving ${e.placement.model} in ${e.placement.stages.length} stage(s)`;
    case "placement_cleared": return `no placement: ${e.reason}`;
    case "training": return `${e.node}: ${e.message}`;
    default: return e.kind;
  }
}

function addEvent(e) {
  const li = el("li", {}, el("time", { text: fmtTime(e.at_ms) }), describe(e));
  $("events").prepend(li);
  while ($("events").children.length > 300) $("events").lastChild.remove();
  const ns = state.nodeState;
  switch (e.kind) {
    case "model_loading": ns[e.node_id] = { text: `measuring ${e.model}…`, cls: "busy" }; break;
    case "model_loaded": ns[e.node_id] = { text: `measured · ${e.layer_decode_ms.toFixed(3)} ms/layer · waiting for the plan`, cls: "busy" }; break;
    case "model_failed": if (e.node_id) ns[e.node_id] = { text: "failed: " + e.reason, cls: "failed" }; state.loading = null; break;
    case "placement_planned": state.plan = e.placement; for (const s of e.placement.stages) ns[s.node_id] = { text: `planned: layers ${s.spec.start}..${s.spec.end}`, cls: "busy" }; break;
    case "stage_loading": ns[e.node_id] = { text: `loading layers ${e.start}..${e.end}…`, cls: "busy" }; break;
    case "stage_loaded": ns[e.node_id] = { text: `loaded layers ${e.start}..${e.end} in ${e.secs.toFixed(2)} s`, cls: "ready" }; break;
    case "stage_failed": ns[e.node_id] = { text: "failed: " + e.reason, cls: "failed" }; break;
    case "placement_active": state.loading = null; state.plan = e.placement; for (const s of e.placement.stages) delete ns[s.node_id]; break;
    case "model_unloaded": delete ns[e.node_id]; break;
    default: break;
  }
}

// One refresh for a burst of events (the history arrives all at once).
let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 200);
}

// Server-sent events through fetch (EventSource cannot send the API key).
let eventsAbort = null;
async function listenEvents() {
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = new AbortController();
  try {
    const r = await api("/api/events", { signal: eventsAbort.signal });
    $("events").replaceChildren();
    for await (const frame of sseFrames(r)) {
      if (frame.event === "cluster") {
        addEvent(JSON.parse(frame.data));
        refreshSoon();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  setTimeout(listenEvents, 2000);
}

async function* sseFrames(response) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const frame = { event: "message", data: "" };
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) frame.event = line.slice(6).trim();
        else if (line.startsWith("data:")) frame.data += line.slice(5).trimStart();
      }
      if (frame.data) yield frame;
    }
  }
}

// ---------------------------------------------------------------- chat
async function refreshChatModels() {
  try {
    const m = await (await api("/v1/models")).json();
    const pick = $("chat-model");
    const current = pick.value;
    pick.replaceChildren(...m.data.map((x) => el("option", { value: x.id, text: x.id })));
    if (current && m.data.some((x) => x.id === current)) pick.value = current;
    $("send").disabled = m.data.length === 0;
    if (!m.data.length) $("chat-stats").textContent = "No model is loaded: load one on the Cluster page.";
  } catch (_) { /* shown elsewhere */ }
}

// Markdown, rendered safely: the text is parsed here and built as DOM
// nodes with textContent, never as HTML, so model output cannot inject
// markup or script (and the page's CSP stays as strict as it is).
function inline(text) {
  const frag = document.createDocumentFragment();
  // `code`, **bold**, *em* / _em_, [text](http(s)://url)
  const re = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*|_[^_\n]+_)|(\[[^\]\n]+\]\((https?:\/\/[^\s)]+)\))/g;
  let at = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > at) frag.append(document.createTextNode(text.slice(at, m.index)));
    const t = m[0];
    if (m[1]) frag.append(el("code", { text: t.slice(1, -1) }));
    else if (m[2]) frag.append(el("strong", {}, inline(t.slice(2, -2))));
    else if (m[3]) frag.append(el("em", {}, inline(t.slice(1, -1))));
    else if (m[4]) {
      const label = t.slice(1, t.indexOf("]("));
      frag.append(el("a", { href: m[5], rel: "noopener noreferrer nofollow", target: "_blank", text: label }));
    }
    at = m.index + t.length;
  }
  if (at < text.length) frag.append(document.createTextNode(text.slice(at)));
  return frag;
}

function markdown(src) {
  const out = document.createDocumentFragment();
  const lines = src.split("\n");
  let para = [];
  let list = null;
  const flush = () => {
    if (para.length) out.append(el("p", {}, inline(para.join("\n"))));
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      flush();
      list = null;
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      const c = el("code", { text: code.join("\n") });
      if (fence[1]) c.dataset.lang = fence[1];
      out.append(el("pre", {}, c));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flush();
      list = null;
      out.append(el("h" + Math.min(6, heading[1].length + 2), {}, inline(heading[2])));
    } else if (bullet || numbered) {
      flush();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = el(tag);
        out.append(list);
      }
      list.append(el("li", {}, inline((bullet || numbered)[1])));
    } else if (line.trim() === "") {
      flush();
      list = null;
    } else {
      list = null;
      para.push(line);
    }
  }
  flush();
  return out;
}

// The conversation is kept in this browser (localStorage) across reloads.
const CHAT_KEY = "hearth-chat";
function saveChat() {
  try {
    localStorage.setItem(CHAT_KEY, JSON.stringify({ system: $("system").value, messages: state.chat }));
  } catch (_) { /* full or disabled: the chat still works */ }
}

function bubble(role, text) {
  const b = el("div", { class: "msg " + role, "data-role": role });
  const body = el("div", { class: "body" });
  if (role === "assistant") body.append(markdown(text));
  else body.textContent = text;
  b.append(body);
  $("messages").append(b);
  b.scrollIntoView({ block: "end" });
  return b;
}

// Each message's actions: edit (a user turn: back into the prompt, the
// conversation cut there) and regenerate (the last answer).
function renderChat() {
  const box = $("messages");
  box.replaceChildren();
  state.chat.forEach((m, i) => {
    const b = bubble(m.role, m.content);
    b.dataset.done = "true";
    const tools = el("div", { class: "actions" });
    if (m.role === "user") {
      const edit = el("button", { type: "button", class: "link edit", text: "Edit" });
      edit.addEventListener("click", () => {
        if (state.abort) return;
        $("prompt").value = m.content;
        state.chat = state.chat.slice(0, i);
        saveChat();
        renderChat();
        $("prompt").focus();
      });
      tools.append(edit);
    }
    if (m.role === "assistant" && i === state.chat.length - 1) {
      const again = el("button", { type: "button", class: "link regenerate", text: "Regenerate" });
      again.addEventListener("click", () => {
        if (state.abort) return;
        state.chat.pop();
        saveChat();
        renderChat();
        answer();
      });
      tools.append(again);
    }
    if (tools.childNodes.length) b.append(tools);
  });
}

/// Streams the answer to the conversation so far into a new bubble.
async function answer() {
  const out = bubble("assistant", "");
  const body = out.querySelector(".body");
  const messages = [];
  const sys = $("system").value.trim();
  if (sys) messages.push({ role: "system", content: sys });
  messages.push(...state.chat);
  const req = {
    model: $("chat-model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
  };
  if ($("max_tokens").value !== "") req.max_tokens = Number($("max_tokens").value);
  if ($("seed").value !== "") req.seed = Number($("seed").value);
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  const started = performance.now();
  let first = null;
  let text = "";
  let pieces = 0;
  const stats = (tokens, final) => {
    const secs = (performance.now() - (first || started)) / 1000;
    const rate = tokens > 1 && secs > 0 ? ((tokens - 1) / secs).toFixed(1) : "…";
    return `${final ? final + " + " : ""}${tokens} generated tokens · first token ${((first || started) - started).toFixed(0)} ms · ${rate} tok/s`;
  };
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: req, signal: state.abort.signal });
    for await (const frame of sseFrames(r)) {
      if (frame.data === "[DONE]") break;
      const chunk = JSON.parse(frame.data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        first = first || performance.now();
        pieces += 1;
        text += delta.content;
        body.replaceChildren(markdown(text));
        out.scrollIntoView({ block: "end" });
        // Speed as it streams (one piece per token, about).
        $("chat-stats").textContent = stats(pieces, null);
      }
      if (chunk.usage) {
        $("chat-stats").textContent = stats(chunk.usage.completion_tokens, `${chunk.usage.prompt_tokens} prompt`);
      }
    }
    out.dataset.done = "true";
    state.chat.push({ role: "assistant", content: text });
  } catch (e) {
    if (e.name !== "AbortError") {
      out.remove();
      bubble("error", e.message);
    } else {
      out.dataset.done = "true";
      state.chat.push({ role: "assistant", content: text });
    }
  } finally {
    state.abort = null;
    $("send").disabled = false;
    $("stop").hidden = true;
    saveChat();
    if (state.chat.length && state.chat[state.chat.length - 1].role === "assistant") renderChat();
  }
}

$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.abort) return;
  $("prompt").value = "";
  state.chat.push({ role: "user", content: text });
  saveChat();
  bubble("user", text);
  await answer();
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("clear").addEventListener("click", () => { state.chat = []; saveChat(); $("messages").replaceChildren(); });
$("system").addEventListener("change", saveChat);

// A conversation from an earlier visit.
try {
  const saved = JSON.parse(localStorage.getItem(CHAT_KEY) || "null");
  if (saved && Array.isArray(saved.messages)) {
    state.chat = saved.messages.filter((m) => m && typeof m.content === "string" && ["user", "assistant"].includes(m.role));
    $("system").value = typeof saved.system === "string" ? saved.system : "";
    renderChat();
  }
} catch (_) { /* a broken record is dropped */ }

// ---------------------------------------------------------------- start
$("apikey").value = state.key;
refresh();
refreshModels();
listenEvents();
setInterval(refresh, 3000);
setInterval(refreshModels, 15000);

// ------------------------------------------------------------ training
async function refreshTrainModels() {
  try {
    const r = await api("/v1/models");
    let ids = (await r.json()).data.map((m) => m.id);
    // A fine-tune served as a LoRA adapter beside its base is not a base
    // to fine-tune (train its base instead).
    try {
      const m = await (await api("/api/models")).json();
      const adapters = new Set(m.available.filter((x) => x.adapter).map((x) => x.name));
      ids = ids.filter((id) => !adapters.has(id));
    } catch (_) { /* the full list, then */ }
    const sel = $("train-model");
    const keep = sel.value;
    sel.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
    if (ids.includes(keep)) sel.value = keep;
  } catch (e) { $("train-msg").textContent = e.message; }
}

$("train-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("train-file").files[0];
  if (!file) return;
  $("train-start").disabled = true;
  $("train-msg").textContent = "uploading…";
  try {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    const h = headers(false);
    const up = await fetch("/v1/files", { method: "POST", headers: h, body: form });
    const upj = await up.json();
    if (!up.ok) throw new Error(upj.error ? upj.error.message : up.statusText);
    const num = (id) => Number($(id).value);
    const body = {
      model: $("train-model").value,
      training_file: upj.id,
      hyperparameters: { n_epochs: num("train-epochs"), batch_size: num("train-batch"), learning_rate_multiplier: num("train-lr") },
      hearth: { micro_batches: num("train-m"), method: { type: "lora", rank: num("train-rank") } },
    };
    if ($("train-suffix").value) body.suffix = $("train-suffix").value;
    const r = await api("/v1/fine_tuning/jobs", { method: "POST", body });
    const job = await r.json();
    $("train-msg").textContent = `started ${job.id}`;
    refreshJobs();
  } catch (e) {
    $("train-msg").textContent = "error: " + e.message;
  } finally {
    $("train-start").disabled = false;
  }
});

function drawLoss(canvas, losses) {
  const w = (canvas.width = canvas.clientWidth || 600), h = (canvas.height = 160);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, w, h);
  if (losses.length === 0) return;
  const max = Math.max(...losses), min = Math.min(0, ...losses);
  const x = (i) => 8 + (i / Math.max(1, losses.length - 1)) * (w - 16);
  const y = (v) => h - 8 - ((v - min) / (max - min || 1)) * (h - 24);
  g.strokeStyle = "#c2410c";
  g.lineWidth = 2;
  g.beginPath();
  losses.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.stroke();
  g.fillStyle = "#6b655c";
  g.font = "12px system-ui";
  g.fillText(`loss ${losses[losses.length - 1].toFixed(4)} (start ${losses[0].toFixed(4)})`, 10, 14);
}

async function renderJob(job) {
  const id = "job-" + job.id;
  let card = $(id);
  if (!card) {
    card = el("div", { class: "card job", id });
    $("jobs").prepend(card);
  }
  const hs = job.hearth || {};
  const head = el("div", { class: "row" },
    el("h2", { text: `${job.id} · ${job.status}` }),
    job.fine_tuned_model ? el("span", { class: "badge", text: job.fine_tuned_model }) : null);
  const stats = el("p", { class: "muted", text:
    `step ${hs.step || 0}/${hs.total_steps || "?"}` +
    (hs.loss != null ? ` · loss ${hs.loss.toFixed(4)}` : "") +
    (hs.tokens_per_s != null ? ` · ${hs.tokens_per_s.toFixed(1)} tok/s` : "") +
    (hs.ideal_bubble != null ? ` · ideal bubble ${(hs.ideal_bubble * 100).toFixed(0)}%` : "") +
    (job.error ? ` · ${job.error.message}` : "") });
  const util = el("div", { class: "util" });
  for (const s of hs.stages || []) {
    const pct = Math.round((s.utilization || 0) * 100);
    const fill = el("span");
    fill.style.width = pct + "%"; // CSSOM: the page's CSP forbids style attributes
    const bar = el("div", { class: "bar" }, fill, el("em", { text: `${pct}% busy` }));
    // A U-shaped job's zero-layer ends: the data's node's embedding and head.
    const what = s.start === s.end ? (s.start === 0 ? "embedding" : "head + loss") : `layers ${s.start}..${s.end}`;
    util.append(el("span", { text: `${s.name} ${what}` }), bar);
  }
  const canvas = el("canvas", { "aria-label": "loss curve" });
  const kids = [head, stats, util, canvas];
  if (["validating_files", "queued", "running"].includes(job.status)) {
    const b = el("button", { class: "secondary", text: "Cancel" });
    b.addEventListener("click", async () => {
      try { await api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: "POST" }); } catch (e) { $("train-msg").textContent = e.message; }
      refreshJobs();
    });
    kids.push(b);
  }
  card.replaceChildren(...kids);
  try {
    const r = await api(`/v1/fine_tuning/jobs/${job.id}/events`);
    const losses = (await r.json()).data.filter((e) => e.type === "metrics").reverse().map((e) => e.data.train_loss);
    drawLoss(canvas, losses);
  } catch (_) { /* the next poll retries */ }
}

async function refreshJobs() {
  try {
    const r = await api("/v1/fine_tuning/jobs");
    for (const job of (await r.json()).data.slice().reverse()) await renderJob(job);
  } catch (_) { /* shown on the next poll */ }
}

setInterval(() => { if (!$("page-train").hidden) refreshJobs(); }, 2000);
$("tab-train").addEventListener("click", () => { refreshTrainModels(); refreshJobs(); });
