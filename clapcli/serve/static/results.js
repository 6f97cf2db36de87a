// The list of hits: one row per file with its waveform, tags and actions; clicking plays from the matching
// window, clicking the waveform seeks, rows drag out of the page into a DAW or a file manager, and the
// keyboard moves and auditions (↑/↓), plays and pauses (Space) and asks for more like this (Enter).

import { audioUrl } from "./api.js";
import { drawWaveform, loadPeaks, timeAt } from "./waveform.js";
import { copyText, fileUrl, formatChannels, formatDuration, formatRate, toast } from "./util.js";

const PEAK_BUCKETS = 800;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(className, text, label) {
  const node = element("button", className, text);
  node.type = "button";
  if (label) node.setAttribute("aria-label", label);
  return node;
}

export class Results {
  constructor(list, player, { onMoreLikeThis, onTag }) {
    this.list = list;
    this.player = player;
    this.onMoreLikeThis = onMoreLikeThis;
    this.onTag = onTag;
    this.rows = []; // {hit, node, canvas, peaks}
    this.current = -1;
    this.visible = new IntersectionObserver((entries) => {
      for (const entry of entries) if (entry.isIntersecting) this.loadWaveform(entry.target);
    }, { rootMargin: "200px" });
    new ResizeObserver(() => this.redrawAll()).observe(list);
    list.addEventListener("click", (event) => this.click(event));
    list.addEventListener("keydown", (event) => this.keydown(event));
    list.addEventListener("dragstart", (event) => this.dragstart(event));
    player.subscribe(() => this.playerChanged());
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.redrawAll());
  }

  get hits() {
    return this.rows.map((row) => row.hit);
  }

  show(hits) {
    const hadFocus = this.list.contains(document.activeElement); // Enter on a row: keep going from the keys
    this.visible.disconnect();
    this.list.replaceChildren();
    this.rows = hits.map((hit, index) => this.row(hit, index));
    this.current = -1;
    for (const row of this.rows) {
      this.list.append(row.node);
      this.visible.observe(row.canvas);
    }
    this.setCurrent(0, { focus: hadFocus });
    this.redrawAll();
  }

  row(hit, index) {
    const node = element("li", "hit");
    node.tabIndex = -1;
    node.draggable = true;
    node.dataset.index = index;
    node.dataset.id = hit.id;
    if (hit.missing) node.classList.add("missing");
    const where = hit.folder ? ` in ${hit.folder}` : "";
    node.setAttribute("aria-label", `${hit.rank}. ${hit.name}${where}, score ${hit.score.toFixed(3)}, `
      + `${formatDuration(hit.duration)}${hit.missing ? ", missing from disk" : ""}`);

    const rank = element("span", "rank", String(hit.rank));
    const head = element("div", "head");
    head.append(element("span", "name", hit.name), element("span", "folder", hit.folder || ""));
    if (hit.missing) head.append(element("span", "badge", "missing"));
    const meta = element("div", "meta");
    meta.append(
      element("span", "score", hit.score.toFixed(3)),
      element("span", "duration", formatDuration(hit.duration)),
      element("span", "format", (hit.format || "").toUpperCase()),
      element("span", "detail",
        [formatRate(hit.sample_rate), formatChannels(hit.channels)].filter(Boolean).join(" · ")),
    );
    const canvas = element("canvas", "wave");
    canvas.setAttribute("aria-hidden", "true"); // the row's label says what it is; clicking it seeks
    const tags = element("div", "tags");
    for (const tag of hit.tags || []) {
      const chip = button("tag", tag.label, `Search for ${tag.label} (tag score ${tag.score.toFixed(2)})`);
      chip.dataset.label = tag.label;
      chip.tabIndex = -1;
      tags.append(chip);
    }
    const actions = element("div", "actions");
    const more = button("more", "More like this", `More like ${hit.name}`);
    const copy = button("copy", "Copy path", `Copy the path of ${hit.name}`);
    more.tabIndex = copy.tabIndex = -1;
    actions.append(more, copy);
    const body = element("div", "body");
    body.append(head, meta, canvas, tags);
    node.append(rank, body, actions);
    return { hit, node, canvas, peaks: null };
  }

  async loadWaveform(canvas) {
    const row = this.rows.find((r) => r.canvas === canvas);
    if (!row || row.peaks) return;
    this.visible.unobserve(canvas);
    try {
      row.peaks = await loadPeaks(row.hit.id, PEAK_BUCKETS);
    } catch {
      row.peaks = { duration: row.hit.duration, peaks: [] }; // the row stays usable; the line shows no shape
    }
    this.draw(row);
  }

  draw(row) {
    const playing = this.player.id === row.hit.id ? this.player.currentTime : null;
    drawWaveform(row.canvas, row.hit, row.peaks, playing);
  }

  redrawAll() {
    for (const row of this.rows) this.draw(row);
  }

  rowOf(event) {
    const node = event.target.closest("li.hit");
    return node ? this.rows[Number(node.dataset.index)] : null;
  }

  /** Make row `index` the current one (the one tab reaches and the keys act on). */
  setCurrent(index, { focus = true, audition = false } = {}) {
    if (!this.rows.length) return;
    index = Math.max(0, Math.min(this.rows.length - 1, index));
    const old = this.rows[this.current];
    if (old) {
      old.node.tabIndex = -1;
      old.node.classList.remove("current");
      old.node.removeAttribute("aria-current");
      for (const control of old.node.querySelectorAll("button")) control.tabIndex = -1;
    }
    const row = this.rows[index];
    this.current = index;
    row.node.tabIndex = 0;
    row.node.classList.add("current");
    row.node.setAttribute("aria-current", "true");
    for (const control of row.node.querySelectorAll("button")) control.tabIndex = 0;
    if (focus) {
      row.node.focus({ preventScroll: true });
      row.node.scrollIntoView({ block: "nearest" });
    }
    if (audition) this.play(row);
  }

  play(row, at = null) {
    if (row.hit.missing) {
      toast(`${row.hit.name} is missing from disk`);
      return;
    }
    this.player.play(row.hit.id, at ?? row.hit.start ?? 0)
      .catch((err) => toast(`Cannot play ${row.hit.name}: ${err.message}`));
  }

  click(event) {
    const row = this.rowOf(event);
    if (!row) return;
    const index = this.rows.indexOf(row);
    if (event.target.closest("button.more")) {
      this.setCurrent(index, { focus: false });
      this.onMoreLikeThis(row.hit);
    } else if (event.target.closest("button.copy")) {
      copyText(row.hit.path).then((ok) => toast(ok ? `Copied ${row.hit.path}` : "Could not copy the path"));
    } else if (event.target.closest("button.tag")) {
      this.onTag(event.target.closest("button.tag").dataset.label);
    } else if (event.target === row.canvas) {
      this.setCurrent(index);
      this.play(row, timeAt(row.canvas, event.clientX, row.hit.duration));
    } else {
      this.setCurrent(index);
      this.play(row);
    }
  }

  keydown(event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const onRow = event.target.matches("li.hit");
    switch (event.key) {
      case "ArrowDown":
      case "ArrowUp":
        event.preventDefault();
        this.setCurrent(this.current + (event.key === "ArrowDown" ? 1 : -1), { audition: true });
        break;
      case "Home":
      case "End":
        event.preventDefault();
        this.setCurrent(event.key === "Home" ? 0 : this.rows.length - 1, { audition: true });
        break;
      case " ":
        if (!onRow) return; // Space on a button presses it
        event.preventDefault();
        this.toggle();
        break;
      case "Enter":
        if (!onRow) return;
        event.preventDefault();
        this.onMoreLikeThis(this.rows[this.current].hit);
        break;
      default:
    }
  }

  /** Space: pause or resume what plays; with nothing loaded yet, play the current row. */
  toggle() {
    const row = this.rows[this.current];
    if (this.player.id === null || (row && this.player.id !== row.hit.id && !this.player.playing)) {
      if (row) this.play(row);
    } else {
      this.player.toggle();
    }
  }

  focusCurrent({ audition = false } = {}) {
    this.setCurrent(Math.max(0, this.current), { audition });
  }

  dragstart(event) {
    const row = this.rowOf(event);
    if (!row) return;
    const { hit } = row;
    // the server says what /api/audio sends: the file itself, or a WAV made on the fly (AIFF, CAF, ...)
    const name = hit.transcoded ? `${hit.name.replace(/\.[^.]*$/, "")}.wav` : hit.name;
    const data = event.dataTransfer;
    data.effectAllowed = "copy";
    // Chromium saves a DownloadURL drop as a file (DAWs, file managers); others take the file:// URL
    data.setData("DownloadURL", `${hit.mime}:${name}:${audioUrl(hit.id)}`);
    data.setData("text/uri-list", fileUrl(hit.path));
    data.setData("text/plain", hit.path);
  }

  playerChanged() {
    for (const row of this.rows) {
      const active = this.player.id === row.hit.id;
      row.node.classList.toggle("playing", active && this.player.playing);
      if (active || row.node.dataset.drawnPlayhead) {
        this.draw(row);
        if (active) row.node.dataset.drawnPlayhead = "1";
        else delete row.node.dataset.drawnPlayhead;
      }
    }
  }
}
