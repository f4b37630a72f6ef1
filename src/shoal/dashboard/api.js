// Every data call the page makes: the node's API with the key from sessionStorage, asked for
// once (a dialog) when a call returns 401; and the log's events read as a stream.

const KEY = "shoal.apiKey";
let asking = null; // one dialog for every call that got a 401 at once

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askKey(why) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("key-dialog");
      const input = document.getElementById("key-input");
      document.getElementById("key-why").textContent = why;
      input.value = "";
      dialog.addEventListener(
        "close",
        () => {
          if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
          asking = null;
          resolve();
        },
        { once: true },
      );
      dialog.showModal();
      input.focus();
    });
  }
  return asking;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body?.error?.message ?? body?.detail ?? response.statusText;
  } catch {
    return response.statusText;
  }
}

/** Asks for another key (a user key cannot place or delete: an admin key can). */
export function changeKey() {
  return askKey("Give the key to use from now on.");
}

/** fetch() with the key; asks for a key on 401 and tries again. Resolves to the Response. */
export async function call(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status !== 401) return response;
    await askKey(await errorText(response));
  }
}

/** call() for JSON: the parsed body, or an ApiError with the API's message. */
export async function json(path, options = {}) {
  const response = await call(path, options);
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response.json();
}

export function post(path, body, signal) {
  const options = { method: "POST", body: JSON.stringify(body), signal };
  options.headers = { "Content-Type": "application/json" };
  return call(path, options);
}

/** Each `data:` payload of a server-sent-events response, parsed as JSON ("[DONE]" as is). */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) yield data === "[DONE]" ? data : JSON.parse(data);
    }
  }
}

/** Calls onEntry for every new log entry (GET /events, kept open, reopened when it ends). */
export async function watchLog(onEntry, onLink) {
  for (;;) {
    try {
      const response = await call("/events");
      if (!response.ok) throw new ApiError(response.status, await errorText(response));
      onLink(true);
      for await (const entry of events(response)) onEntry(entry);
    } catch (err) {
      console.debug("event stream ended", err);
    }
    onLink(false);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
