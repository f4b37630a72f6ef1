// The nodes view: one card per node the cluster knows, from the replicated state.

import { badge, bytes, colour, el, knowNodes, short } from "./format.js";

function memory(label, total, free) {
  const used = Math.max(0, total - free);
  return [
    el("dt", {}, label),
    el(
      "dd",
      {},
      el("meter", { min: 0, max: total || 1, value: used, "aria-label": `${label} used` }),
      `${bytes(used)} of ${bytes(total)} used`,
    ),
  ];
}

function card(record, isMaster, self) {
  const p = record.profile;
  const state = record.connected ? "connected" : "lost";
  const title = el(
    "h3",
    {},
    el(
      "span",
      { style: { color: colour(record.node_id) }, title: record.node_id },
      short(record.node_id),
    ),
    isMaster ? badge("master") : null,
    badge(state),
    self ? badge("this node", "self") : null,
  );
  const rows = [];
  if (p) {
    rows.push(el("dt", {}, "host"), el("dd", {}, p.hostname));
    rows.push(el("dt", {}, "system"), el("dd", {}, `${p.os} ${p.arch} · ${p.cpu_cores} cores`));
    const device = (g) => (g.backend === "metal" ? "mps" : `cuda:${g.index ?? 0}`);
    const gpus = p.gpus.map((g) => `${device(g)} ${g.name}`);
    rows.push(el("dt", {}, "devices"), el("dd", {}, ["CPU: " + p.cpu_model, ...gpus].join(" · ")));
    rows.push(...memory("RAM", p.ram_total, p.ram_available));
    for (const gpu of p.gpus)
      rows.push(...memory(`${device(gpu)} ${gpu.name}`, gpu.memory_total, gpu.memory_free));
    rows.push(el("dt", {}, "engines"), el("dd", {}, p.engines.join(", ") || "none"));
    const links = (p.links ?? []).map((l) =>
      el(
        "li",
        { dataset: { peer: l.peer }, style: { color: colour(l.peer) } },
        `${short(l.peer)} ${l.rtt_ms.toFixed(2)} ms`,
      ),
    );
    rows.push(
      el("dt", {}, "links"),
      el(
        "dd",
        { class: "links" },
        links.length ? el("ul", { "aria-label": "round trips to peers" }, links) : "none measured",
      ),
    );
  } else {
    rows.push(el("dt", {}, "profile"), el("dd", { class: "empty" }, "not reported yet"));
  }
  if (!record.connected && record.lost_reason) {
    rows.push(el("dt", {}, "lost"), el("dd", {}, record.lost_reason));
  }
  return el(
    "li",
    {
      class: "card",
      dataset: { node: record.node_id, connected: String(record.connected) },
      "aria-label": `node ${short(record.node_id)} ${state}`,
    },
    title,
    el("dl", {}, rows),
  );
}

/** Draws every node of `state`; `self` is the id of the node serving the page. */
export function renderTopology(state, self) {
  const records = Object.values(state.nodes);
  knowNodes(records.map((r) => r.node_id));
  const list = document.getElementById("nodes");
  list.replaceChildren(
    ...records.map((r) => card(r, r.node_id === state.master, r.node_id === self)),
  );
  if (!records.length) list.append(el("li", { class: "empty" }, "no nodes yet"));
  const up = records.filter((r) => r.connected).length;
  const master = state.master ? short(state.master) : "none";
  const log = `term ${state.term} · index ${state.index}`;
  return `${up} of ${records.length} nodes connected · master ${master} · ${log}`;
}
