// Wires the views: the state, instances and models are read again after each log entry
// (debounced) and every 5 s (liveness, and the requests per instance, which are not logged).

import { changeKey, json, watchLog } from "./api.js";
import { renderPicker, setupChat } from "./chat.js";
import { renderInstances } from "./instances.js";
import { renderModels } from "./models.js";
import { renderTopology } from "./topology.js";

const DEBOUNCE_MS = 150; // a burst of entries is one read
const FALLBACK_MS = 5000; // liveness: the page notices a node it cannot reach even with no entries

let self = null;
let models = [];
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
  renderModels(models, drawModels);
}

function soon() {
  clearTimeout(timer);
  timer = setTimeout(refresh, DEBOUNCE_MS);
}

setupChat();
document.getElementById("change-key").addEventListener("click", () => changeKey().then(refresh));
refresh();
setInterval(refresh, FALLBACK_MS);
watchLog(soon, (up) => {
  link(up ? "live" : "down", up ? "live" : "reconnecting");
  if (up) soon();
});
