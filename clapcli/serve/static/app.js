// The page of `clap serve`: a client of its JSON API and nothing more. Wires the search box, the drop zone,
// the results, the map and the status line together.

import { ApiError, getJson, postFile } from "./api.js";
import { LibraryMap } from "./map.js";
import { Player } from "./player.js";
import { Results } from "./results.js";
import { forgetPeaks } from "./waveform.js";
import { copyText, debounce, formatAgo, plural, toast } from "./util.js";

const K = 50; // results per query
const TYPING_MS = 250; // results as you type: this long after the last key
const STATUS_EVERY_MS = 4000;

const $ = (id) => document.getElementById(id);
const box = $("q");
const player = new Player($("player"));

let pending = null; // the AbortController of the request whose results are awaited
let lastAsk = null; // () => Promise: the current query, asked again when the index changes

const results = new Results($("results"), player, {
  onMoreLikeThis: (hit) => ask(() => getJson("api/similar", { id: hit.id, k: K }, { signal: pending.signal }),
    `More like ${hit.name}`),
  onTag: (label) => {
    box.value = label;
    searchNow();
  },
});

const map = new LibraryMap($("map"), $("map-tip"), player, {
  onSelection: showSelection,
  onPick: (id) => {
    const index = results.hits.findIndex((hit) => hit.id === id);
    if (index >= 0) results.setCurrent(index, { focus: false });
    player.play(id, 0).catch((err) => toast(err.message));
  },
});

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function describe(query) {
  const texts = (query?.text ?? []).map((t) => `“${t}”`);
  const sounds = (query?.audio ?? []).map((a) => a.split(/[\\/]/).pop());
  const parts = [...texts, ...sounds];
  const not = (query?.not ?? []).map((t) => ` − “${t}”`).join("");
  return parts.join(" + ") + not;
}

/** Run one query (a search, more like this, an upload): the newest one wins, older answers are dropped. */
async function ask(request, title) {
  pending?.abort();
  pending = new AbortController();
  const mine = pending;
  lastAsk = () => ask(request, title);
  $("results").setAttribute("aria-busy", "true");
  try {
    const answer = await request();
    if (mine !== pending) return;
    showMessage("");
    const heading = title ?? describe(answer.query);
    $("results-title").textContent = answer.hits.length
      ? `${plural(answer.hits.length, "result")} · ${heading}`
      : `No results · ${heading}`;
    results.show(answer.hits);
    map.setHighlight(answer.hits.map((hit) => hit.id));
  } catch (err) {
    if (err.name === "AbortError" || mine !== pending) return;
    showMessage(err instanceof ApiError ? err.message : `The server did not answer: ${err.message}`);
  } finally {
    if (mine === pending) $("results").removeAttribute("aria-busy");
  }
}

function searchNow() {
  typing.cancel();
  const q = box.value.trim();
  if (!q) {
    pending?.abort();
    lastAsk = null;
    showMessage("");
    $("results-title").textContent = "";
    results.show([]);
    map.setHighlight([]);
    return;
  }
  // pending is replaced inside ask() before the request runs
  ask(() => getJson("api/search", { q, k: K }, { signal: pending.signal }));
}

const typing = debounce(searchNow, TYPING_MS);
box.addEventListener("input", typing);
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchNow();
});
box.addEventListener("keydown", (event) => {
  if (event.key === "ArrowDown" && results.hits.length) {
    event.preventDefault();
    results.focusCurrent({ audition: true });
  }
});

// Query by example: the file picker, or a file dropped anywhere on the page
function upload(file) {
  if (!file) return;
  ask(() => postFile("api/similar-audio", file, { signal: pending.signal }), `Sounds like ${file.name}`);
}

$("file").addEventListener("change", (event) => {
  upload(event.target.files[0]);
  event.target.value = ""; // choosing the same file again asks again
});
const carriesFiles = (event) => event.dataTransfer?.types?.includes("Files");
window.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
  $("drop").classList.add("over");
});
window.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) $("drop").classList.remove("over");
});
window.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault(); // not: open the file in place of the page
  $("drop").classList.remove("over");
  upload(event.dataTransfer.files[0]);
});

// Keys anywhere: `/` goes to the search box, Space plays or pauses when no control wants it
const typingInto = (target) => target.closest?.("input, textarea, select, [contenteditable]");
document.addEventListener("keydown", (event) => {
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey || typingInto(event.target)) return;
  if (event.key === "/") {
    event.preventDefault();
    box.focus();
    box.select();
  } else if (event.key === " " && !event.target.closest("button, a, li.hit, label")) {
    event.preventDefault();
    results.toggle();
  }
});

// The map: colour by folder or top tag; the selection's paths to copy or download
let colour = "folder";
let mapAsked = 0; // the newest map request: an older answer arriving late must not replace it
async function loadMap() {
  const mine = ++mapAsked;
  try {
    const data = await getJson("api/map", { color: colour });
    if (mine !== mapAsked) return;
    map.setData(data);
    $("map-info").textContent = `${plural(data.ids.length, "file")} · ${data.method.toUpperCase()}`;
    const legend = $("legend");
    legend.replaceChildren();
    data.legend.forEach((name, group) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = map.colorOfGroup(group);
      item.append(swatch, document.createTextNode(name || "(top)"));
      legend.append(item);
    });
  } catch (err) {
    if (mine === mapAsked) $("map-info").textContent = `No map: ${err.message}`;
  }
}

for (const radio of document.querySelectorAll('input[name="color"]')) {
  radio.addEventListener("change", () => {
    colour = radio.value;
    loadMap();
  });
}
$("select-results").addEventListener("click", () => map.selectIds(results.hits.map((hit) => hit.id)));

let downloadUrl = null;
function showSelection(indices) {
  const paths = indices.map((i) => map.path(i));
  $("selection").hidden = paths.length === 0;
  $("selection-count").textContent = `${plural(paths.length, "file")} selected`;
  $("selection-paths").value = paths.join("\n");
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = paths.length ? URL.createObjectURL(new Blob([`${paths.join("\n")}\n`], { type: "text/plain" })) : null;
  $("selection-download").href = downloadUrl ?? "#";
}
$("selection-copy").addEventListener("click", () => {
  copyText($("selection-paths").value).then((ok) => toast(ok ? "Copied the paths" : "Could not copy"));
});
$("selection-clear").addEventListener("click", () => map.select([], false));

// The status line, polled: the index, its model, its size and last update; a note while `clap index` writes
let generation = null;
async function pollStatus() {
  try {
    const status = await getJson("api/status");
    // a model given as a local folder is shown by its name (the whole path is in the tooltip)
    const local = /^([A-Za-z]:)?[\\/]/.test(status.model);
    const model = local ? status.model.split(/[\\/]/).filter(Boolean).pop() : status.model;
    $("status").textContent = `${status.index} · ${model} · ${plural(status.files, "file")} · `
      + `updated ${formatAgo(status.updated_at)}`;
    $("status").title = `${status.path} · model ${status.model} · labels ${status.labels} · clap ${status.version}`;
    $("writing").hidden = !status.writing;
    if (generation !== null && status.generation !== generation) {
      forgetPeaks();
      loadMap();
      lastAsk?.();
    }
    generation = status.generation;
  } catch (err) {
    $("status").textContent = `The server does not answer (${err.message})`;
  }
}

pollStatus();
setInterval(pollStatus, STATUS_EVERY_MS);
loadMap();
box.focus();
