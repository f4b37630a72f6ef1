// The models view: the catalog with whether each model runs, and placing one with a preview.

import { json, post } from "./api.js";
import { badge, bytes, el, short, tokS } from "./format.js";

// model id -> { options, chosen, error, busy }: what a "Place…" panel shows across redraws
const open = new Map();
let redraw = () => {};
let pullsByModel = new Map(); // model id -> this node's latest pull of it
let pullsChanged = () => {};
const pullErrors = new Map(); // model id -> why POST /v1/pulls was refused

async function startPull(id) {
  pullErrors.delete(id);
  const response = await post("/v1/pulls", { model: id });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    pullErrors.set(id, answer?.error?.message ?? response.statusText);
  }
  pullsChanged();
}

/** A pull's progress, or why it failed (null: none). */
function pullLine(id) {
  if (pullErrors.has(id)) return el("div", { role: "alert", class: "reason" }, pullErrors.get(id));
  const p = pullsByModel.get(id);
  if (!p) return null;
  if (p.status === "failed")
    return el("div", { role: "alert", class: "reason" }, `pull failed: ${p.reason}`);
  if (p.status === "done")
    return el("div", { class: "reason", dataset: { pull: "done" } }, "pulled to this node");
  const pct = p.total ? Math.floor((100 * p.done) / p.total) : 0;
  return el(
    "div",
    { class: "pull", dataset: { pull: p.status } },
    el("progress", { max: p.total || 1, value: p.done, "aria-label": `pulling ${id}` }),
    ` pulling ${pct}% (${bytes(p.done)} of ${bytes(p.total)})`,
  );
}

/** [state word, text] of a model's status, as /v1/models reports it. */
export function modelState(model) {
  switch (model.status) {
    case "ready":
      return ["ready", "ready: an instance serves it"];
    case "available":
      // this machine's answer (runs here now / after a download of N GB / cannot, why)
      return ["available", model.availability ?? "fits the cluster"];
    case "downloading":
    case "loading":
      return [model.status, `${model.status}: its progress is under Instances`];
    case "failed":
      return ["failed", `failed: ${model.reason ?? "a runner failed"}`];
    default:
      return ["unavailable", `cannot run: ${model.reason ?? "no placement fits"}`];
  }
}

function optionText(p) {
  const nodes = p.nodes.map(short).join(" + ");
  if (!p.fits) return `${nodes}: does not fit (${p.reason ?? "memory"})`;
  const by = p.chosen_by.length ? ` [${p.chosen_by.join(", ")}]` : "";
  return `${nodes}: ${tokS(p.predicted_tok_s)}${by}`;
}

async function showPreviews(id) {
  open.set(id, { options: null, chosen: 0, busy: true });
  redraw();
  try {
    const answer = await json(`/instance/previews?model_id=${encodeURIComponent(id)}`);
    const options = answer.previews;
    const first = Math.max(
      0,
      options.findIndex((p) => p.fits),
    );
    open.set(id, { options, chosen: first, busy: false });
  } catch (err) {
    open.set(id, { options: [], chosen: 0, busy: false, error: err.message });
  }
  redraw();
}

/** An option's layers as a manual split: "NODE:START-END,..." (a node's GPUs share its part). */
function splitText(option) {
  const parts = [];
  for (const s of option?.stages ?? []) {
    const last = parts[parts.length - 1];
    if (last && last.node === s.node_id && last.end === s.start) last.end = s.end;
    else parts.push({ node: s.node_id, start: s.start, end: s.end });
  }
  return parts.map((p) => `${p.node}:${p.start}-${p.end}`).join(",");
}

async function place(id) {
  const panel = open.get(id);
  const option = panel.options[panel.chosen];
  const manual = (panel.layers ?? "").trim();
  // a split typed in wins; an option a policy picks is placed by that policy; any other by
  // its layer split
  let body;
  if (manual) body = { model: id, layers: manual };
  else if (option.chosen_by.length) body = { model: id, policy: option.chosen_by[0] };
  else body = { model: id, layers: splitText(option) };
  open.set(id, { ...panel, busy: true, error: null });
  redraw();
  const response = await post("/instance", body);
  if (response.ok) {
    open.delete(id);
  } else {
    const answer = await response.json().catch(() => ({}));
    open.set(id, { ...panel, busy: false, error: answer?.error?.message ?? response.statusText });
  }
  redraw();
}

function panel(id) {
  const state = open.get(id);
  if (!state) return null;
  if (!state.options) return el("div", { class: "previews" }, "asking for placements…");
  const select = el(
    "select",
    { "aria-label": `placement for ${id}` },
    state.options.map((p, i) =>
      el("option", { value: i, disabled: !p.fits, selected: i === state.chosen }, optionText(p)),
    ),
  );
  select.addEventListener("change", () => {
    state.chosen = Number(select.value);
    manual.placeholder = splitText(state.options[state.chosen]) || "NODE:START-END,…";
  });
  // a free-form split, NODE:START-END,... (a node id or a unique prefix of one)
  const manual = el("input", {
    type: "text",
    class: "manual-split",
    "aria-label": `manual split for ${id}`,
    placeholder: splitText(state.options[state.chosen]) || "NODE:START-END,…",
    value: state.layers ?? "",
    spellcheck: "false",
  });
  const fits = () => state.options.some((p) => p.fits) || Boolean((state.layers ?? "").trim());
  const button = el(
    "button",
    { type: "button", class: "primary", disabled: state.busy || !fits(), onclick: () => place(id) },
    "Place",
  );
  manual.addEventListener("input", () => {
    state.layers = manual.value;
    button.disabled = state.busy || !fits();
  });
  return el(
    "div",
    { class: "previews" },
    state.options.length ? select : el("span", { class: "empty" }, "no placement options"),
    el("label", {}, "or split ", manual),
    button,
    el(
      "button",
      {
        type: "button",
        onclick: () => {
          open.delete(id);
          redraw();
        },
      },
      "Cancel",
    ),
    state.error ? el("span", { role: "alert", class: "reason" }, state.error) : null,
  );
}

function row(model) {
  const [state, text] = modelState(model);
  const placeable = model.runnable && model.status !== "failed";
  return el(
    "tr",
    { dataset: { model: model.id, state } },
    el(
      "td",
      {},
      el("strong", {}, model.id),
      el("br"),
      el(
        "span",
        { class: "reason" },
        `${model.architecture} · ${model.quantization} · ${model.layers} layers`,
      ),
    ),
    // storage_size_megabytes is MiB (exo's field): shown as GiB, not as decimal GB
    el("td", {}, `${(model.storage_size_megabytes / 1024).toFixed(2)} GiB`),
    el(
      "td",
      {},
      badge(state),
      el("div", { class: "reason" }, text),
      pullLine(model.id),
      panel(model.id),
    ),
    el(
      "td",
      {},
      model.availability_kind === "needs_download" && !pulling(model.id)
        ? el(
            "button",
            {
              type: "button",
              "aria-label": `pull ${model.id}`,
              title: "download its files to this node",
              onclick: () => startPull(model.id),
            },
            "Pull",
          )
        : null,
      placeable && !open.has(model.id)
        ? el(
            "button",
            {
              type: "button",
              "aria-label": `place ${model.id}`,
              onclick: () => showPreviews(model.id),
            },
            "Place…",
          )
        : null,
    ),
  );
}

function pulling(id) {
  const p = pullsByModel.get(id);
  return p && (p.status === "starting" || p.status === "downloading");
}

/** Draws the catalog; `again` redraws it from the last listing (after a panel changes);
 * `pulls` are this node's (GET /v1/pulls), `readPulls` reads them again. */
export function renderModels(models, again, pulls = [], readPulls = () => {}) {
  redraw = again;
  pullsChanged = readPulls;
  pullsByModel = new Map();
  for (const p of [...pulls].reverse()) pullsByModel.set(p.model, p); // newest wins
  // a redraw would take the caret out of a split being typed: the next one draws it
  if (document.activeElement?.classList?.contains("manual-split")) return;
  const order = { ready: 0, loading: 1, downloading: 1, available: 2, failed: 3, unavailable: 4 };
  const sorted = [...models].sort(
    (a, b) => (order[a.status] ?? 5) - (order[b.status] ?? 5) || a.id.localeCompare(b.id),
  );
  document.querySelector("#model-table tbody").replaceChildren(...sorted.map(row));
}
