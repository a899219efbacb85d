// chatrl web page: chat, compare two models, label which answer is better.
// Plain JavaScript, no build step, no network access beyond this server: it speaks the
// server's own OpenAI-compatible /v1 API (streamed server-sent events) and its /ui routes.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("chatrl.apiKey") || "",
  config: null,
  models: [],
  history: [],        // the chat conversation (user/assistant turns; the system prompt is added per request)
  chatAbort: null,
  cmp: null,          // the comparison on screen: {prompt, system, blind, left, right, voted, prompt_id}
  cmpAbort: null,
  prompts: [],        // a --prompts labelling session: [{id, prompt, done}]
  promptIndex: -1,
};

// ---------------------------------------------------------------------------------------------
// Talking to the server

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; this.name = "ApiError"; }
}

const STATUS_WORDS = { 401: "Not authorised (401)", 413: "Request too large (413)", 503: "Server busy (503)" };

async function errorFrom(response) {
  let message = response.statusText || "no details";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status text */ }
  const words = STATUS_WORDS[response.status] ||
    (response.status >= 500 ? `Server error (${response.status})` : `Request refused (${response.status})`);
  return new ApiError(response.status, `${words}: ${message}`);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers() });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `Cannot reach the server (${e.message}); is chatrl serve still running?`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

function settings() {
  const number = (id, fallback) => {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : fallback;
  };
  const seed = parseInt($("seed").value, 10);
  return {
    system: $("system").value.trim(),
    temperature: number("temperature", 0.7),
    top_p: number("top-p", 0.9),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 128))),
    seed: Number.isFinite(seed) ? seed : null,
  };
}

// Stream one answer; calls onDelta(text) per piece; resolves to the finish reason.
async function streamChat(model, messages, onDelta, signal) {
  const s = settings();
  const body = { model, messages, stream: true, temperature: s.temperature, top_p: s.top_p,
                 max_tokens: s.max_tokens };
  if (s.seed !== null) body.seed = s.seed;
  const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `The connection broke during the answer (${e.message})`);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(500, `The model failed: ${obj.error.message}`);
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  throw new ApiError(0, "The answer ended before the server finished it (connection closed)");
}

function withSystem(turns, system) {
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

// ---------------------------------------------------------------------------------------------
// Errors and status, always in the page

function showError(err) {
  if (err && err.name === "AbortError") return;
  const box = $("error");
  box.textContent = (err && err.message) || String(err);
  box.hidden = false;
  if (err && err.status === 401) $("api-key").classList.add("bad");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

window.addEventListener("unhandledrejection", (e) => showError(e.reason));
window.addEventListener("error", (e) => showError(new Error(`Page error: ${e.message}`)));

// ---------------------------------------------------------------------------------------------
// Connecting: the page's config, then the model list (which also checks the key)

async function init() {
  $("api-key").value = state.key;
  try {
    const r = await fetch("/ui/config");
    if (!r.ok) throw await errorFrom(r);
    state.config = await r.json();
  } catch (e) {
    $("status").textContent = "not connected";
    showError(e.status !== undefined ? e : new ApiError(0, `Cannot reach the server (${e.message})`));
    return;
  }
  selectTab(state.config.compare || state.config.prompts ? "compare" : "chat");
  if (state.config.auth && !state.key) {
    $("status").textContent = "API key needed";
    $("api-key").classList.add("bad");
    showError(new ApiError(401, "This server needs an API key: type it into the API key box above " +
                                "(the --api-key the server was started with) and press Connect."));
    $("api-key").focus();
    return;
  }
  await connect();
}

async function connect() {
  clearError();
  $("api-key").classList.remove("bad");
  document.body.dataset.ready = "0";
  try {
    const body = await (await api("/v1/models")).json();
    state.models = body.data.map((m) => m.id);
    fillModelPickers();
    $("status").textContent = `connected · ${state.models.length} model${state.models.length > 1 ? "s" : ""}`;
    await refreshCounts();
    if (state.config.prompts) await loadPrompts();
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = "not connected";
    showError(e);
  }
}

function fillModelPickers() {
  const fill = (select, chosen) => {
    select.replaceChildren(...state.models.map((id) => new Option(id, id, false, id === chosen)));
  };
  const [a, b] = state.config.compare || [state.models[0], state.models[1] || state.models[0]];
  fill($("chat-model"), state.models[0]);
  fill($("cmp-model-a"), a);
  fill($("cmp-model-b"), b);
  $("chat-model").disabled = state.models.length < 2;
}

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("panel-chat").hidden = name !== "chat";
  $("panel-compare").hidden = name !== "compare";
}

// ---------------------------------------------------------------------------------------------
// Chat

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : role === "assistant" ? $("chat-model").value : "System";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
  $("chat-model").disabled = busy || state.models.length < 2;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || state.chatAbort) return;
  clearError();
  $("chat-input").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  state.chatAbort = controller;
  setChatBusy(true);
  let answer = "";
  try {
    const messages = withSystem(state.history, settings().system);
    const finish = await streamChat($("chat-model").value, messages, (piece) => {
      answer += piece;
      out.textContent = answer;
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    }, controller.signal);
    bubble.dataset.finish = finish || "";
    state.history.push({ role: "assistant", content: answer });
    if (!answer) { out.textContent = "(empty answer)"; out.classList.add("empty"); }
  } catch (e) {
    if (e.name === "AbortError") {  // stopped by the user: keep what was said so far
      bubble.dataset.finish = "stopped";
      state.history.push({ role: "assistant", content: answer });
      out.textContent = answer + " [stopped]";
    } else {  // the turn failed: take it back so it can be sent again
      state.history.pop();
      bubble.classList.add("error");
      bubble.dataset.finish = "error";
      out.textContent = e.message;
      $("chat-input").value = text;
      showError(e);
    }
  } finally {
    bubble.classList.remove("streaming");
    state.chatAbort = null;
    setChatBusy(false);
  }
}

function resetChat() {
  if (state.chatAbort) state.chatAbort.abort();
  state.history = [];
  $("chat-log").replaceChildren();
  clearError();
}

// ---------------------------------------------------------------------------------------------
// Compare and label

function side(name) {
  const el = $(`cmp-${name}`);
  return { el, name: el.querySelector(".name"), state: el.querySelector(".state"), answer: el.querySelector(".answer") };
}

function setVotesEnabled(enabled) {
  for (const b of document.querySelectorAll(".vote")) b.disabled = !enabled;
}

function showNames(reveal) {
  const c = state.cmp;
  for (const s of ["left", "right"]) {
    side(s).name.textContent = !c ? "" : c.blind && !reveal ? "(name hidden until you vote)" : c[s].model;
  }
}

async function runCompare(promptId = null) {
  const prompt = $("cmp-prompt").value.trim();
  if (!prompt) { showError(new Error("Type a prompt for both models to answer.")); return; }
  if (state.cmpAbort) return;
  clearError();
  const a = $("cmp-model-a").value, b = $("cmp-model-b").value;
  const blind = $("blind").checked;
  const [left, right] = blind && Math.random() < 0.5 ? [b, a] : [a, b];  // blind: no position bias
  const system = settings().system;
  const c = state.cmp = {
    prompt, system, blind, voted: false, prompt_id: promptId,
    left: { model: left, text: "", ok: false }, right: { model: right, text: "", ok: false },
  };
  showNames(false);
  setVotesEnabled(false);
  $("cmp-next").hidden = true;
  $("vote-result").textContent = "";
  const controller = new AbortController();
  state.cmpAbort = controller;
  $("cmp-go").disabled = true;
  $("cmp-stop").disabled = false;
  const messages = withSystem([{ role: "user", content: prompt }], system);

  const run = async (name) => {
    const s = side(name), answer = c[name];
    s.el.className = "side streaming";
    s.answer.textContent = "";
    s.state.textContent = "generating…";
    try {
      await streamChat(answer.model, messages, (piece) => {
        answer.text += piece;
        s.answer.textContent = answer.text;
      }, controller.signal);
      answer.ok = true;
      s.state.textContent = "done";
      if (!answer.text) { s.answer.textContent = "(empty answer)"; s.answer.classList.add("empty"); }
      else s.answer.classList.remove("empty");
    } catch (e) {
      if (e.name === "AbortError") {
        s.state.textContent = "stopped";
      } else {
        s.el.classList.add("error");
        s.state.textContent = "failed";
        s.answer.textContent = e.message;
        showError(e);
      }
    } finally {
      s.el.classList.remove("streaming");
    }
  };
  await Promise.all([run("left"), run("right")]);
  state.cmpAbort = null;
  $("cmp-go").disabled = false;
  $("cmp-stop").disabled = true;
  if (state.cmp === c && c.left.ok && c.right.ok) {
    setVotesEnabled(true);
    $("vote-result").textContent = "Which answer is better?";
  } else if (state.cmp === c) {
    $("vote-result").textContent = "Both answers must finish before you can vote; generate again.";
  }
}

const VERDICT_WORDS = { left: "left is better", right: "right is better", tie: "a tie", both_bad: "both bad" };

async function vote(verdict) {
  const c = state.cmp;
  if (!c || c.voted) return;
  setVotesEnabled(false);
  try {
    const body = {
      prompt: c.prompt, system: c.system || null, verdict, blind: c.blind, prompt_id: c.prompt_id,
      left: { model: c.left.model, text: c.left.text }, right: { model: c.right.model, text: c.right.text },
    };
    const counts = await (await api("/ui/votes", { method: "POST", body: JSON.stringify(body) })).json();
    c.voted = true;
    showNames(true);
    if (verdict === "left" || verdict === "right") side(verdict).el.classList.add("chosen");
    $("vote-result").textContent = `Recorded: ${VERDICT_WORDS[verdict]} (${c.left.model} vs ${c.right.model}).`;
    showCounts(counts);
    if (c.prompt_id !== null && state.prompts[c.prompt_id]) {
      state.prompts[c.prompt_id].done = true;
      showSession();
      $("cmp-next").hidden = !state.prompts.some((p) => !p.done);
    }
  } catch (e) {
    setVotesEnabled(true);
    showError(e);
  }
}

function showCounts(counts) {
  const cfg = state.config;
  $("label-count").textContent =
    `${counts.pairs} preference pair${counts.pairs === 1 ? "" : "s"} collected in ${cfg.labels_file}` +
    ` · ${counts.ties} tie/both-bad in ${cfg.ties_file}`;
  $("label-count").dataset.pairs = counts.pairs;
  $("label-count").dataset.ties = counts.ties;
}

async function refreshCounts() {
  showCounts(await (await api("/ui/votes")).json());
}

async function download(kind) {
  try {
    const blob = await (await api(`/ui/votes/download?kind=${kind}`)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = kind === "pairs" ? state.config.labels_file : state.config.ties_file;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 5000);
  } catch (e) {
    showError(e);
  }
}

// A --prompts labelling session: walk the prompts, starting at the first one not yet labelled.

async function loadPrompts() {
  state.prompts = (await (await api("/ui/prompts")).json()).prompts;
  $("session").hidden = state.prompts.length === 0;
  const first = state.prompts.findIndex((p) => !p.done);
  openPrompt(first >= 0 ? first : 0, false);
}

function showSession() {
  const done = state.prompts.filter((p) => p.done).length;
  const here = state.prompts[state.promptIndex];
  $("session-text").textContent = `Labelling session: prompt ${state.promptIndex + 1} of ${state.prompts.length}` +
    ` · ${done} labelled${here && here.done ? " (this one is labelled)" : ""}`;
}

function openPrompt(index, generate = true) {
  if (index < 0 || index >= state.prompts.length || state.cmpAbort) return;
  state.promptIndex = index;
  $("cmp-prompt").value = state.prompts[index].prompt;
  showSession();
  if (generate) runCompare(index);
}

function nextUnlabelled() {
  const n = state.prompts.length;
  for (let k = 1; k <= n; k++) {
    const i = (state.promptIndex + k) % n;
    if (!state.prompts[i].done) return openPrompt(i);
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
$("connect").addEventListener("click", () => {
  state.key = $("api-key").value.trim();
  localStorage.setItem("chatrl.apiKey", state.key);
  connect();
});
$("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("connect").click(); });
$("chat-send").addEventListener("click", sendChat);
$("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
$("chat-reset").addEventListener("click", resetChat);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); }
});
$("cmp-go").addEventListener("click", () => {
  const here = state.prompts[state.promptIndex];
  runCompare(here && here.prompt === $("cmp-prompt").value.trim() ? state.promptIndex : null);
});
$("cmp-stop").addEventListener("click", () => state.cmpAbort && state.cmpAbort.abort());
for (const b of document.querySelectorAll(".vote")) b.addEventListener("click", () => vote(b.dataset.verdict));
$("cmp-next").addEventListener("click", nextUnlabelled);
$("prompt-prev").addEventListener("click", () => openPrompt(state.promptIndex - 1));
$("prompt-next").addEventListener("click", () => openPrompt(state.promptIndex + 1));
$("download-pairs").addEventListener("click", () => download("pairs"));
$("download-ties").addEventListener("click", () => download("ties"));

init();
