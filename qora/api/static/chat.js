// The chat page of `qora serve`: one conversation, streamed through /v1/chat/completions.
// Model text is only ever set as textContent (never parsed as HTML).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, model: null };
$("key").value = localStorage.getItem("qora-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("qora-key", $("key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text || "";
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "(" + e.message + ")";
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Server-sent events: "data: {...}" lines separated by blank lines, "data: [DONE]" at the end.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!state.model) await loadModel();
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  const thinking = document.createElement("div");
  thinking.className = "think";
  const answer = document.createElement("span");
  out.append(thinking, answer);
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  let reply = "", first = null, tokens = 0;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: state.model, messages: state.messages, stream: true,
        stream_options: { include_usage: true }, max_tokens: Number($("max").value) || 1024,
        chat_template_kwargs: { enable_thinking: $("think").checked },
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (!delta) continue;
      if (delta.reasoning_content || delta.content) first = first || performance.now();
      if (delta.reasoning_content) thinking.textContent += delta.reasoning_content;
      if (delta.content) { reply += delta.content; answer.textContent = reply; }
      out.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message;
      out.appendChild(err);
    }
  } finally {
    if (!thinking.textContent) thinking.remove();
    if (first && tokens > 1) {
      const seconds = (performance.now() - first) / 1000;
      $("speed").textContent = (tokens / seconds).toFixed(1) + " tok/s";
    }
    state.messages.push({ role: "assistant", content: reply });
    state.controller = null;
    busy(false);
    out.dataset.done = "1";
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").textContent = "";
});
loadModel();
