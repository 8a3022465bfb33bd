// kiln dashboard: the chat playground of a generation deployment.
// Posts the conversation (a form with the session's CSRF token; no API key) to the
// page's stream endpoint and reads its Server-Sent Events with fetch + ReadableStream,
// appending each delta as text (textContent: the model's output is never markup).
// When the stream ends it shows the time to first token, tokens/s and the usage.
"use strict";

(function () {
  const panel = document.getElementById("playground");
  if (!panel) return;
  const form = document.getElementById("playground-form");
  const conversation = document.getElementById("conversation");
  const message = document.getElementById("message");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const errorBox = document.getElementById("playground-error");
  const chat = panel.dataset.chat === "true";
  let turns = []; // [{role, content}] of the finished exchanges
  let controller = null;

  function stat(name, text) {
    const cell = panel.querySelector('[data-stat="' + name + '"]');
    if (cell) cell.textContent = text;
  }

  function bubble(role, text) {
    const item = document.createElement("div");
    item.className = "turn turn-" + role;
    const who = document.createElement("strong");
    who.textContent = role + ": ";
    const body = document.createElement("span");
    body.className = "content";
    body.textContent = text;
    item.append(who, body);
    conversation.append(item);
    return body;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = false;
  }

  function errorText(body, status) {
    const error = body && body.error;
    if (error && typeof error === "object" && error.message) return String(error.message);
    if (body && body.message) return String(body.message);
    return "the request failed (HTTP " + status + ")";
  }

  // One SSE event's data: a chunk's delta text, its finish reason, its usage, or an error.
  function onEvent(data, state) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      state.error = errorText(chunk, 200);
      return;
    }
    if (chunk.usage) state.usage = chunk.usage;
    (chunk.choices || []).forEach(function (choice) {
      const text = chat ? choice.delta && choice.delta.content : choice.text;
      if (text) {
        if (state.first === null) state.first = performance.now();
        state.last = performance.now();
        state.text += text;
        state.target.textContent = state.text;
      }
      if (choice.finish_reason) state.finish = choice.finish_reason;
    });
  }

  async function readEvents(response, state) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        event.split("\n").forEach(function (line) {
          if (line.startsWith("data: ")) onEvent(line.slice(6), state);
        });
      }
    }
  }

  function showStats(state) {
    const ttft = state.first === null ? null : (state.first - state.started) / 1000;
    stat("ttft", ttft === null ? "—" : ttft.toFixed(3) + " s");
    const usage = state.usage;
    stat("prompt_tokens", usage ? String(usage.prompt_tokens) : "—");
    stat("completion_tokens", usage ? String(usage.completion_tokens) : "—");
    stat("finish_reason", state.finish || "—");
    // tokens after the first over the time they took (the first one's wait is the TTFT)
    const seconds = state.first === null ? 0 : (state.last - state.first) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    stat("tokens_per_s", seconds > 0 && tokens > 1 ? ((tokens - 1) / seconds).toFixed(1) : "—");
  }

  async function submit(event) {
    event.preventDefault();
    const text = message.value;
    if (!text.trim() || controller) return;
    errorBox.hidden = true;
    const sent = chat ? turns.concat([{ role: "user", content: text }]) : [{ role: "user", content: text }];
    const fields = new URLSearchParams();
    fields.set("csrf", form.elements.csrf.value);
    fields.set("messages", JSON.stringify(sent));
    if (form.elements.system) fields.set("system", form.elements.system.value);
    fields.set("max_tokens", form.elements.max_tokens.value);
    fields.set("temperature", form.elements.temperature.value);
    bubble("user", text);
    const state = {
      started: performance.now(),
      first: null,
      last: null,
      text: "",
      usage: null,
      finish: null,
      error: null,
      target: bubble("assistant", ""),
    };
    ["ttft", "tokens_per_s", "prompt_tokens", "completion_tokens", "finish_reason"].forEach(
      function (name) { stat(name, "…"); }
    );
    controller = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    try {
      const response = await fetch(panel.dataset.url, {
        method: "POST",
        body: fields,
        credentials: "same-origin",
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch (e) { body = null; }
        state.error = errorText(body, response.status);
      } else {
        await readEvents(response, state);
        if (chat && !state.error) turns = sent.concat([{ role: "assistant", content: state.text }]);
        message.value = "";
      }
    } catch (e) {
      state.error = e.name === "AbortError" ? "stopped" : String(e);
    } finally {
      controller = null;
      send.disabled = false;
      stop.hidden = true;
      showStats(state);
      panel.dataset.done = String(Number(panel.dataset.done || "0") + 1);
      if (state.error) showError(state.error);
    }
  }

  form.addEventListener("submit", submit);
  stop.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("clear").addEventListener("click", function () {
    turns = [];
    conversation.replaceChildren();
  });
})();
