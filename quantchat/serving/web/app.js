// quantchat chat page: plain JavaScript, no build step, no outside requests.
// It talks to this server's OpenAI-compatible API (relative URLs, so it also works behind a prefix),
// streams answers over SSE and renders model output as text only (never as HTML).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"), model: $("model"), status: $("status"), settings: $("settings"),
    toggleSettings: $("toggle-settings"), closeSettings: $("close-settings"), scrim: $("scrim"),
    system: $("system"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    temperatureValue: $("temperature-value"), topPValue: $("top-p-value"), maxTokensValue: $("max-tokens-value"),
    contextHint: $("context-hint"), apiKey: $("api-key"), reset: $("reset-settings"), jsonMode: $("json-mode"),
    scroller: $("scroller"), empty: $("empty"), emptyModel: $("empty-model"), messages: $("messages"),
    notice: $("notice"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
  };

  const DEFAULTS = { temperature: "0.7", topP: "0.95", maxTokens: "512", system: "" };
  const KEY_MESSAGE = "This server needs an API key: enter it under Settings → API key.";

  const state = {
    history: [],        // {role, content, el}: the conversation sent with every request
    models: new Map(),  // id -> max_model_len
    busy: false,
    controller: null,
    modelsTimer: null,
  };

  // -- small helpers ------------------------------------------------------------------------
  const store = {
    get(k, d) { try { const v = localStorage.getItem("quantchat." + k); return v === null ? d : v; } catch { return d; } },
    set(k, v) { try { localStorage.setItem("quantchat." + k, v); } catch { /* private mode */ } },
    del(k) { try { localStorage.removeItem("quantchat." + k); } catch { /* private mode */ } },
  };
  const url = (path) => new URL(path, document.baseURI).href;

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = el.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function errorFrom(res) {
    let detail = "";
    try {
      const body = await res.json();
      detail = (body && body.error && body.error.message) || (body && typeof body.detail === "string" && body.detail) || "";
    } catch { /* not JSON */ }
    switch (res.status) {
      case 401:
        return el.apiKey.value.trim() ? "The server refused this API key: check it under Settings → API key." : KEY_MESSAGE;
      case 429:
        return `The server is busy (too many requests waiting). Try again in a moment.${detail ? "\n" + detail : ""}`;
      case 503:
        return `The model is not ready: ${detail || "it is still loading"}.`;
      default:
        return detail ? `${detail} (HTTP ${res.status})` : `The server answered HTTP ${res.status}.`;
    }
  }

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
    el.status.title = text;
  }

  function showNotice(text) { el.notice.textContent = text; el.notice.hidden = false; }
  function hideNotice() { el.notice.hidden = true; el.notice.textContent = ""; }

  function fmt(x, digits = 1) { return Number.isFinite(x) ? x.toFixed(digits) : "–"; }
  function fmtMs(ms) { return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`; }

  // -- settings ---------------------------------------------------------------------------
  const sliders = [
    [el.temperature, el.temperatureValue, "temperature", (v) => (+v).toFixed(2)],
    [el.topP, el.topPValue, "topP", (v) => (+v).toFixed(2)],
    [el.maxTokens, el.maxTokensValue, "maxTokens", (v) => String(v)],
  ];

  function showSlider([input, out, , show]) { out.textContent = show(input.value); }

  function loadSettings() {
    for (const s of sliders) {
      s[0].value = store.get(s[2], DEFAULTS[s[2]]);
      showSlider(s);
      s[0].addEventListener("input", () => { showSlider(s); store.set(s[2], s[0].value); });
    }
    el.system.value = store.get("system", DEFAULTS.system);
    el.system.addEventListener("input", () => store.set("system", el.system.value));
    el.jsonMode.checked = store.get("jsonMode", "") === "1";
    el.jsonMode.addEventListener("change", () => store.set("jsonMode", el.jsonMode.checked ? "1" : ""));
    el.apiKey.value = store.get("apiKey", "");
    el.apiKey.addEventListener("change", () => {
      const key = el.apiKey.value.trim();
      if (key) store.set("apiKey", key); else store.del("apiKey");
      el.apiKey.classList.remove("attention");
      loadModels();
    });
    el.reset.addEventListener("click", () => {
      for (const s of sliders) { s[0].value = DEFAULTS[s[2]]; showSlider(s); store.set(s[2], s[0].value); }
      el.system.value = DEFAULTS.system;
      store.set("system", "");
      el.jsonMode.checked = false;
      store.set("jsonMode", "");
    });
  }

  function openSettings(open) {
    el.app.classList.toggle("show-settings", open);
    el.toggleSettings.setAttribute("aria-expanded", String(open));
    el.scrim.hidden = !open;
  }

  function askForKey() {
    if (window.matchMedia("(max-width: 860px)").matches) openSettings(true);
    el.apiKey.classList.add("attention");
    el.apiKey.focus();
  }

  // -- models -----------------------------------------------------------------------------
  function retryModels(ms) {
    clearTimeout(state.modelsTimer);
    state.modelsTimer = setTimeout(loadModels, ms);
  }

  function placeholderOption(text) {
    const o = document.createElement("option");
    o.value = "";
    o.textContent = text;
    el.model.replaceChildren(o);
  }

  async function loadModels() {
    clearTimeout(state.modelsTimer);
    let res;
    try {
      res = await fetch(url("v1/models"), { headers: headers(false), cache: "no-store" });
    } catch {
      setStatus("offline", "server unreachable");
      placeholderOption("server unreachable");
      retryModels(3000);
      return updateButtons();
    }
    if (res.status === 401) {
      const msg = await errorFrom(res);
      setStatus("key", "API key needed");
      placeholderOption("API key needed");
      showNotice(msg);
      askForKey();
      return updateButtons();
    }
    if (!res.ok) {
      setStatus("offline", `server error ${res.status}`);
      showNotice(await errorFrom(res));
      retryModels(5000);
      return updateButtons();
    }
    let models = [];
    try { models = (await res.json()).data || []; } catch { /* keep empty */ }
    if (!models.length) {
      setStatus("loading", "model loading…");
      placeholderOption("model loading…");
      retryModels(2000);
      return updateButtons();
    }
    hideNotice();
    const previous = el.model.value || store.get("model", "");
    state.models = new Map(models.map((m) => [m.id, m.max_model_len || null]));
    el.model.replaceChildren(...models.map((m) => {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id;
      return o;
    }));
    el.model.value = state.models.has(previous) ? previous : models[0].id;
    onModelChange();
    if (!state.busy) setStatus("ready", "ready");
    updateButtons();
  }

  function onModelChange() {
    const id = el.model.value;
    if (id) store.set("model", id);
    const ctx = state.models.get(id);
    el.contextHint.textContent = ctx ? `longest answer; the model's context is ${ctx} tokens` :
      "longest answer; capped by the model's context";
    el.emptyModel.textContent = id ? `Chatting with ${id}` : "Answers stream from the quantized model on this server.";
  }

  // -- rendering --------------------------------------------------------------------------
  function nearBottom() {
    const s = el.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
  }
  function toBottom() { el.scroller.scrollTop = el.scroller.scrollHeight; }

  // Text with ``` fences shown as code blocks; everything goes through text nodes (XSS-safe).
  function renderText(node, text) {
    const frag = document.createDocumentFragment();
    const parts = text.split("```");
    parts.forEach((part, i) => {
      if (i % 2 === 0) {
        let t = part;
        if (i > 0) t = t.replace(/^\n+/, "");  // code blocks are blocks: no blank line around them
        if (i < parts.length - 1) t = t.replace(/\n+$/, "");
        if (t) frag.append(document.createTextNode(t));
        return;
      }
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (/^[\w+#.-]{1,24}$/.test(lang)) pre.dataset.lang = lang;
      code.textContent = (nl >= 0 ? part.slice(nl + 1) : part).replace(/\n$/, "");
      pre.append(code);
      frag.append(pre);
    });
    node.replaceChildren(frag);
  }

  function addMessage(role, text, label) {
    const wrap = document.createElement("div");
    wrap.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = label || (role === "user" ? "You" : "Assistant");
    const content = document.createElement("div");
    content.className = "content";
    wrap.append(who, content);
    if (role === "assistant") {
      const stats = document.createElement("div");
      stats.className = "stats";
      wrap.append(stats);
    }
    renderText(content, text);
    el.messages.append(wrap);
    el.empty.hidden = true;
    toBottom();
    return wrap;
  }

  // An answer being streamed: repaints at most once a frame.
  function streamView(wrap) {
    const content = wrap.querySelector(".content");
    let pending = null;
    let frame = 0;
    const paint = () => {
      frame = 0;
      const stick = nearBottom();
      renderText(content, pending);
      if (stick) toBottom();
    };
    return {
      set(text) { pending = text; if (!frame) frame = requestAnimationFrame(paint); },
      flush() { if (frame) { cancelAnimationFrame(frame); frame = 0; } if (pending !== null) paint(); },
    };
  }

  function setStats(wrap, parts) {
    const stats = wrap.querySelector(".stats");
    stats.replaceChildren(...parts.map(([text, cls]) => {
      const s = document.createElement("span");
      s.textContent = text;
      if (cls) s.className = cls;
      return s;
    }));
  }

  function updateButtons() {
    const ready = !!el.model.value;
    const hasUser = state.history.some((m) => m.role === "user");
    el.send.disabled = state.busy || !ready || !el.prompt.value.trim();
    el.regenerate.disabled = state.busy || !ready || !hasUser;
    el.clear.disabled = !state.history.length && !el.messages.childElementCount;
    el.send.hidden = state.busy;
    el.stop.hidden = !state.busy;
  }

  function setBusy(busy) {
    state.busy = busy;
    if (busy) setStatus("busy", "generating…");
    else if (el.model.value) setStatus("ready", "ready");
    updateButtons();
  }

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  // -- streaming --------------------------------------------------------------------------
  // Yields the data of each server-sent event of a fetch body.
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    const take = function* (final) {
      for (;;) {
        const m = /\r?\n\r?\n/.exec(buf);
        let block;
        if (m) { block = buf.slice(0, m.index); buf = buf.slice(m.index + m[0].length); }
        else if (final && buf.trim()) { block = buf; buf = ""; }
        else return;
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        yield* take(false);
      }
      buf += decoder.decode();
      yield* take(true);
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // Tokens left for the answer (null when the server can't tell): asks /tokenize for the prompt's size.
  async function contextRoom(model, messages, signal) {
    const ctx = state.models.get(model);
    if (!ctx) return null;
    try {
      const res = await fetch(url("tokenize"), {
        method: "POST", headers: headers(true), signal, body: JSON.stringify({ model, messages }),
      });
      if (!res.ok) return null;
      const body = await res.json();
      return typeof body.count === "number" ? { room: ctx - body.count, ctx, prompt: body.count } : null;
    } catch (e) {
      if (e.name === "AbortError") throw e;
      return null;
    }
  }

  async function generate() {
    const model = el.model.value;
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of state.history) messages.push({ role: m.role, content: m.content });

    const wrap = addMessage("assistant", "", model);
    wrap.dataset.done = "0";
    const view = streamView(wrap);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let text = "", chunks = 0, usage = null, finish = null, error = null, stopped = false;
    let t0 = performance.now(), tFirst = null, tLast = null, capped = null;
    try {
      let maxTokens = Math.max(1, Math.round(+el.maxTokens.value));
      const room = await contextRoom(model, messages, controller.signal);
      if (room && room.room < 1) {
        throw new ApiError(`The conversation (${room.prompt} tokens) fills the model's context of ${room.ctx} ` +
          "tokens: press Clear to start over.", 400);
      }
      if (room && room.room < maxTokens) { maxTokens = room.room; capped = maxTokens; }

      const body = {
        model, messages, stream: true, stream_options: { include_usage: true },
        temperature: +el.temperature.value, top_p: Math.max(0.01, +el.topP.value), max_tokens: maxTokens,
      };
      if (el.jsonMode.checked) body.response_format = { type: "json_object" };
      t0 = performance.now();
      const res = await fetch(url("v1/chat/completions"), {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) throw new ApiError(await errorFrom(res), res.status);
      if (!res.body) throw new ApiError("This browser cannot read streamed responses.");
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") break;
        let obj;
        try { obj = JSON.parse(data); } catch { continue; }
        if (obj.error) throw new ApiError(obj.error.message || "the server reported an error", obj.error.code);
        if (obj.usage) usage = obj.usage;
        const choice = obj.choices && obj.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (tFirst === null) tFirst = now;
          tLast = now;
          chunks += 1;
          text += piece;
          view.set(text);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else error = e instanceof ApiError ? e : new ApiError(`Connection to the server failed (${e.message}).`);
    } finally {
      if (state.controller === controller) state.controller = null;
    }
    view.flush();

    if (controller.signal.aborted && !wrap.isConnected) { // cleared while streaming
      setBusy(false);
      return;
    }
    const stick = nearBottom();
    finishAnswer(wrap, { text, chunks, usage, finish, error, stopped, t0, tFirst, tLast, capped });
    if (stick) toBottom();
    setBusy(false);
  }

  function finishAnswer(wrap, { text, chunks, usage, finish, error, stopped, t0, tFirst, tLast, capped }) {
    const content = wrap.querySelector(".content");
    if (error && !text) {
      wrap.classList.add("error");
      content.textContent = error.message + (error.status === 401 ? "" : "\nPress Regenerate to try again.");
      if (error.status === 401) {
        showNotice(error.message);
        askForKey();
      }
      wrap.dataset.done = "1";
      state.history[state.history.length - 1].failed = true;
      return;
    }
    if (error) {
      const note = document.createElement("div");
      note.className = "error-note";
      note.textContent = `The answer was cut short: ${error.message}`;
      wrap.insertBefore(note, wrap.querySelector(".stats"));
    }
    if (!text) {
      const span = document.createElement("span");
      span.className = "placeholder";
      span.textContent = stopped ? "(stopped before the first token)" : "(empty answer)";
      content.replaceChildren(span);
    }
    state.history.push({ role: "assistant", content: text, el: wrap });

    const n = usage && typeof usage.completion_tokens === "number" ? usage.completion_tokens : chunks;
    const parts = [[`${n} token${n === 1 ? "" : "s"}`]];
    if (tFirst !== null) {
      const decodeS = (tLast - tFirst) / 1000;
      const rate = n > 1 && decodeS > 0 ? (n - 1) / decodeS : n / ((tLast - t0) / 1000);
      parts.push([`${fmt(rate)} tok/s`]);
      parts.push([`first token ${fmtMs(tFirst - t0)}`]);
      parts.push([`total ${fmtMs(tLast - t0)}`]);
    }
    if (stopped) parts.push(["stopped", "warn"]);
    else if (finish === "length") parts.push([capped ? `stopped at the context limit (${capped} tokens)` :
      "stopped at max tokens", "warn"]);
    else if (capped) parts.push([`max tokens capped at ${capped} by the context`]);
    setStats(wrap, parts);
    wrap.dataset.done = "1";
  }

  // -- actions ----------------------------------------------------------------------------
  // Removes history entries from index i on, with their messages and everything shown after them.
  function truncate(i) {
    const first = state.history[i];
    if (first && first.el) {
      while (first.el.nextSibling) first.el.nextSibling.remove();
      first.el.remove();
    }
    state.history.length = Math.min(state.history.length, i);
  }

  function send() {
    const text = el.prompt.value;
    if (state.busy || !text.trim() || !el.model.value) return;
    // a turn that failed (no answer) is replaced by the new message
    const last = state.history[state.history.length - 1];
    if (last && last.role === "user" && last.failed) truncate(state.history.length - 1);
    hideNotice();
    const wrap = addMessage("user", text);
    state.history.push({ role: "user", content: text, el: wrap });
    el.prompt.value = "";
    autosize();
    generate();
  }

  function regenerate() {
    if (state.busy || !el.model.value) return;
    let u = state.history.length - 1;
    while (u >= 0 && state.history[u].role !== "user") u -= 1;
    if (u < 0) return;
    const user = state.history[u];
    while (user.el.nextSibling) user.el.nextSibling.remove();
    state.history.length = u + 1;
    user.failed = false;
    hideNotice();
    generate();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function clear() {
    stop();
    state.history = [];
    el.messages.replaceChildren();
    el.empty.hidden = false;
    hideNotice();
    updateButtons();
    el.prompt.focus();
  }

  // -- wiring -----------------------------------------------------------------------------
  loadSettings();
  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  el.prompt.addEventListener("input", () => { autosize(); updateButtons(); });
  el.stop.addEventListener("click", stop);
  el.regenerate.addEventListener("click", regenerate);
  el.clear.addEventListener("click", clear);
  el.model.addEventListener("change", onModelChange);
  el.toggleSettings.addEventListener("click", () => openSettings(!el.app.classList.contains("show-settings")));
  el.closeSettings.addEventListener("click", () => openSettings(false));
  el.scrim.addEventListener("click", () => openSettings(false));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      if (state.busy) stop();
      else openSettings(false);
    }
  });
  updateButtons();
  loadModels();
  el.prompt.focus();
})();
