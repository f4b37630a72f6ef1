// The instances view: each instance's stages as layer bars across nodes, each runner's state.

import { call } from "./api.js";
import { badge, bytes, colour, el, short, tokS, where } from "./format.js";

/** [state word, detail] of one stage's runner (none yet: pending). */
export function runnerState(runner) {
  if (!runner) return ["pending", "waiting for its node"];
  const s = runner.status;
  const pct = (done, total) => (total ? `${Math.floor((100 * done) / total)}%` : "");
  switch (s.kind) {
    case "downloading":
      return [
        "downloading",
        `downloading ${pct(s.done, s.total)} (${bytes(s.done)} of ${bytes(s.total)})`,
      ];
    case "loading":
      return ["loading", `loading ${pct(s.done, s.total)} (${s.done} of ${s.total} layers)`];
    case "ready":
      return ["ready", `ready${s.engine ? ` (${s.engine})` : ""}`];
    default:
      return ["failed", `failed: ${s.reason}`];
  }
}

function stageBar(instance, runners) {
  return el(
    "div",
    { class: "layers", role: "img", "aria-label": `layers of ${instance.instance_id}` },
    instance.stages.map((stage, i) => {
      const [state, detail] = runnerState(runners[i]);
      const device = where(stage);
      const text = `${short(stage.node_id)} [${stage.start}, ${stage.end})${device ? ` ${device}` : ""}`;
      return el(
        "div",
        {
          class: "stage",
          dataset: { state, node: stage.node_id, device: stage.device ?? "" },
          style: { flex: String(stage.end - stage.start), backgroundColor: colour(stage.node_id) },
          title: `${text} ${stage.engine}: ${detail}`,
        },
        text,
      );
    }),
  );
}

const failures = new Map(); // instance id -> why its Delete failed, shown until the next try
let redraw = () => {};

async function remove(id, button) {
  button.disabled = true;
  failures.delete(id);
  const response = await call(`/instance/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    failures.set(id, body?.error?.message ?? response.statusText);
    redraw();
  }
}

function row(instance) {
  const runners = instance.runners;
  const states = instance.stages.map((_, i) => runnerState(runners[i]));
  const ready = states.every(([s]) => s === "ready");
  const overall = ready
    ? "ready"
    : (states.find(([s]) => s === "failed")?.[0] ?? states.find(([s]) => s !== "ready")[0]);
  const del = el(
    "button",
    { type: "button", class: "danger", "aria-label": `delete ${instance.instance_id}` },
    "Delete",
  );
  del.addEventListener("click", () => remove(instance.instance_id, del));
  return el(
    "li",
    { dataset: { instance: instance.instance_id, state: overall } },
    el(
      "div",
      { class: "row-head" },
      el("span", { class: "name" }, instance.instance_id),
      badge(overall),
      el(
        "span",
        {},
        `${instance.n_layers} layers · ${instance.stages.length} stage(s) · ${instance.policy}`,
      ),
      instance.predicted_tok_s
        ? el("span", {}, `predicted ${tokS(instance.predicted_tok_s)}`)
        : null,
      el(
        "span",
        { class: "load", title: "this node's own requests on the instance" },
        `${instance.load.running} running · ${instance.load.waiting} waiting · ` +
          `${tokS(instance.load.tok_s)} from this node`,
      ),
      el("span", { class: "spacer" }),
      del,
    ),
    failures.has(instance.instance_id)
      ? el("p", { role: "alert", class: "reason" }, failures.get(instance.instance_id))
      : null,
    stageBar(instance, runners),
    el(
      "ol",
      { class: "stages-detail", start: 0 },
      instance.stages.map((stage, i) =>
        el(
          "li",
          { dataset: { stage: String(i) } },
          `${short(stage.node_id)} layers [${stage.start}, ${stage.end}) ` +
            `${stage.engine}${where(stage) ? ` on ${where(stage)}` : ""}: ${states[i][1]}`,
        ),
      ),
    ),
  );
}

/** Draws every instance (GET /v1/instances' rows); `again` redraws them (after a failure). */
export function renderInstances(rows, again = () => {}) {
  redraw = again;
  const records = rows;
  const list = document.getElementById("instance-list");
  list.replaceChildren(...records.map(row));
  if (!records.length)
    list.append(el("li", { class: "empty" }, "no instances: place a model below"));
}
