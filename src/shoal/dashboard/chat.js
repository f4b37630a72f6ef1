// The chat playground: a model picker, a streamed answer, Stop, and the request's TTFT and tok/s.

import { events, post } from "./api.js";
import { el } from "./format.js";

const history = []; // {role, content} of the conversation so far
let controller = null; // the request in flight, to abort with Stop

const $ = (id) => document.getElementById(id);

/** Offers every model that can run now, ready ones first; keeps the user's choice. */
export function renderPicker(models) {
  const select = $("chat-model");
  const chosen = select.value;
  const runnable = models.filter((m) => m.runnable);
  runnable.sort(
    (a, b) => (b.status === "ready") - (a.status === "ready") || a.id.localeCompare(b.id),
  );
  select.replaceChildren(
    ...runnable.map((m) =>
      el("option", { value: m.id, selected: m.id === chosen }, `${m.id} (${m.status})`),
    ),
  );
}

function say(role, text) {
  const item = el("li", { dataset: { role } }, text);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function stats(start, first, end, tokens) {
  const parts = [];
  if (first !== null) parts.push(`TTFT ${Math.round(first - start)} ms`);
  if (first !== null && tokens > 1 && end > first) {
    parts.push(`${(((tokens - 1) * 1000) / (end - first)).toFixed(1)} tok/s`);
  }
  parts.push(`${tokens} tokens`);
  return parts.join(" · ");
}

async function ask(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  history.push({ role: "user", content: text });
  say("user", text);
  const answer = say("assistant", "");
  answer.setAttribute("aria-busy", "true");
  const body = {
    model: $("chat-model").value,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("chat-temperature").value),
    max_tokens: Number($("chat-max-tokens").value),
  };
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const start = performance.now();
  let first = null;
  let tokens = 0;
  let usage = null;
  const out = $("chat-stats");
  try {
    const response = await post("/v1/chat/completions", body, controller.signal);
    if (!response.ok) {
      const failed = await response.json().catch(() => ({}));
      throw new Error(failed?.error?.message ?? response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk === "[DONE]") break;
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        first ??= performance.now();
        tokens += 1;
        answer.textContent += delta;
        out.value = stats(start, first, performance.now(), tokens);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.dataset.stopped = "true";
    else say("error", err.message);
  } finally {
    const end = performance.now();
    out.value =
      stats(start, first, end, usage?.completion_tokens ?? tokens) +
      (answer.dataset.stopped ? " · stopped" : "");
    answer.removeAttribute("aria-busy");
    history.push({ role: "assistant", content: answer.textContent });
    controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

export function setupChat() {
  $("chat-form").addEventListener("submit", ask);
  $("chat-stop").addEventListener("click", () => controller?.abort());
  $("chat-clear").addEventListener("click", () => {
    history.length = 0;
    $("chat-log").replaceChildren();
    $("chat-stats").value = "";
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
}
