// Wires the views: the state, instances and models are read again after each log entry
// (debounced) and every 5 s (liveness, and the requests per instance, which are not logged).

import { changeKey, json, watchLog } from "./api.js";
import { renderPicker, setupChat } from "./chat.js";
import { renderInstances } from "./instances.js";
import { renderModels } from "./models.js";
import { renderTopology } from "./topology.js";

const DEBOUNCE_MS = 150; // a burst of entries is one read
const FALLBACK_MS = 5000; // liveness: the page notices a node it cannot reach even with no entries
const PULL_MS = 1000; // while this node pulls a model, its progress is read this often

let self = null;
let models = [];
let pulls = [];
let pulling = null; // the timer that reads /v1/pulls while one runs
let timer = null;
let reading = false;
let again = false;

function link(state, text) {
  const badge = document.getElementById("link");
  badge.dataset.state = state;
  badge.textContent = text;
}

async function refresh() {
  if (reading) {
    again = true; // one more read once this one ends, never two at once
    return;
  }
  reading = true;
  try {
    self ??= await json("/node_id");
    const [state, placed, listing] = await Promise.all([
      json("/state"),
      json("/v1/instances"),
      json("/v1/models"),
    ]);
    document.getElementById("summary").textContent = renderTopology(state, self);
    const drawInstances = () => renderInstances(placed.data, drawInstances);
    drawInstances();
    models = listing.data;
    drawModels();
    renderPicker(models);
    document.body.dataset.index = String(state.index);
  } catch (err) {
    link("down", "node unreachable");
    document.getElementById("summary").textContent = `cannot read the state: ${err.message}`;
  } finally {
    reading = false;
    if (again) {
      again = false;
      soon();
    }
  }
}

function drawModels() {
  renderModels(models, drawModels, pulls, readPulls);
}

/** This node's pulls; read again every PULL_MS while one is under way, then the models. */
async function readPulls() {
  clearTimeout(pulling);
  try {
    pulls = (await json("/v1/pulls")).data;
  } catch {
    pulls = []; // a node without a Hub cache pulls nothing
  }
  drawModels();
  const active = pulls.some((p) => p.status === "starting" || p.status === "downloading");
  if (active) pulling = setTimeout(readPulls, PULL_MS);
  else if (pulls.length) soon(); // one ended: what runs here has changed
}

function soon() {
  clearTimeout(timer);
  timer = setTimeout(refresh, DEBOUNCE_MS);
}

setupChat();
readPulls();
document.getElementById("change-key").addEventListener("click", () => changeKey().then(refresh));
refresh();
setInterval(refresh, FALLBACK_MS);
watchLog(soon, (up) => {
  link(up ? "live" : "down", up ? "live" : "reconnecting");
  if (up) soon();
});
