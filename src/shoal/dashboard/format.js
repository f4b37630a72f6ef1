// Small helpers every view uses: elements, sizes, node names and colours.

/** An element with attributes and children (strings become text, never HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "style")
      Object.assign(node.style, value); // CSSOM: allowed by the CSP
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n < 10 && i > 0 ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

/** The first characters after the libp2p prefix: "12D3KooWAbCd…" → "AbCdEf". */
export function short(nodeId) {
  return nodeId.startsWith("12D3KooW") ? nodeId.slice(8, 14) : nodeId.slice(0, 8);
}

const PALETTE = [
  "#2f5bd3",
  "#1a7f4b",
  "#b25e09",
  "#8e3bb5",
  "#0f7c8c",
  "#b42363",
  "#5c6b00",
  "#6b4f2a",
];
const order = new Map(); // node id -> its place among the known nodes

/** Fixes each node's colour by its place in the cluster's (sorted) node list. */
export function knowNodes(nodeIds) {
  nodeIds.forEach((id, i) => order.set(id, i));
}

/** One colour per node, so a node's layers look alike in every instance and in its card. */
export function colour(nodeId) {
  return PALETTE[(order.get(nodeId) ?? 0) % PALETTE.length];
}

export function badge(text, state = text) {
  return el("span", { class: "badge", dataset: { state } }, text);
}

/** Where a stage runs: "cuda:0", "cuda:1 + cpu 4 layers", "cuda 10/14" (llama.cpp), or "". */
export function where(stage) {
  let text = stage.device ?? "";
  if (stage.gpu_split?.length) text += ` ${stage.gpu_split.join("/")}`;
  if (stage.cpu_layers) text += ` + cpu ${stage.cpu_layers} layers`;
  return text.trim();
}

export function tokS(value) {
  return value === null || value === undefined ? "?" : `${value.toFixed(1)} tok/s`;
}
