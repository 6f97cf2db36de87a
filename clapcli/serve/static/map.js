// The library as a map (/api/map: 2-D positions of the file vectors, similar sounds close together) on one
// canvas. Points are written straight into an ImageData, and hit-testing goes through a grid of cells, so a
// library of 100,000 files draws and answers the pointer at once. Hovering a point plays a short preview, a
// lasso selects (Shift adds), and the current query's results light up.

// Tableau 10 and two more: distinct on light and dark backgrounds
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#86bcb6", "#d37295", "#8cd17d"];
const OTHER = "#9a9a9a";
const CELL = 16; // CSS px: the side of a hit-testing cell
const REACH = 8; // CSS px: how close the pointer must come to a point
const PAD = 10; // CSS px around the points
const PREVIEW_SECONDS = 3;
const HOVER_DELAY_MS = 120;

function rgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function insidePolygon(x, y, polygon) {
  let inside = false;
  for (let i = 0, j = polygon.length - 1; i < polygon.length; j = i++) {
    const [xi, yi] = polygon[i];
    const [xj, yj] = polygon[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

export class LibraryMap {
  constructor(canvas, tip, player, { onSelection, onPick }) {
    this.canvas = canvas;
    this.tip = tip;
    this.player = player;
    this.onSelection = onSelection; // fn(array of point indices)
    this.onPick = onPick; // fn(id): a click on a point
    this.data = null;
    this.count = 0;
    this.selected = new Uint8Array(0); // per point: 1 when selected
    this.chosen = []; // the selected points' indices, in order
    this.highlighted = [];
    this.hovered = -1;
    this.drag = null;
    this.hoverTimer = null;
    new ResizeObserver(() => this.layout()).observe(canvas);
    canvas.addEventListener("pointerdown", (e) => this.pointerdown(e));
    canvas.addEventListener("pointermove", (e) => this.pointermove(e));
    canvas.addEventListener("pointerup", (e) => this.pointerup(e));
    canvas.addEventListener("pointerleave", () => this.leave());
    canvas.addEventListener("keydown", (e) => {
      if (e.key === "Escape") this.select([], false);
    });
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.draw());
  }

  setData(data) {
    this.data = data;
    this.count = data.ids.length;
    this.indexOfId = new Map(data.ids.map((id, i) => [id, i]));
    this.selected = new Uint8Array(this.count);
    this.chosen = [];
    this.hovered = -1;
    this.setHighlight(this.highlightIds ?? []);
    this.layout();
    this.onSelection([]);
  }

  /** The index ids of the current results: drawn on top, ringed. */
  setHighlight(ids) {
    this.highlightIds = ids;
    this.highlighted = this.data ? ids.map((id) => this.indexOfId.get(id)).filter((i) => i !== undefined) : [];
    this.draw();
  }

  colorOf(i) {
    return this.colorOfGroup(this.data.groups?.[i]);
  }

  colorOfGroup(group) {
    const name = this.data.legend?.[group];
    if (group === undefined || group === null || group < 0 || name === "other" || name === "") return OTHER;
    return PALETTE[group % PALETTE.length];
  }

  path(i) {
    if (this.data.paths) return this.data.paths[i];
    const folder = this.data.folders?.[i];
    return folder && folder !== "." ? `${folder}/${this.data.names[i]}` : this.data.names[i];
  }

  /** Screen positions (CSS px), the grid of cells, and the points drawn into the base image. */
  layout() {
    const width = this.canvas.clientWidth;
    const height = this.canvas.clientHeight;
    const dpr = window.devicePixelRatio || 1;
    this.dpr = dpr;
    this.width = width;
    this.height = height;
    this.canvas.width = Math.max(1, Math.round(width * dpr));
    this.canvas.height = Math.max(1, Math.round(height * dpr));
    if (!this.data || !width || !height) {
      this.base = null;
      this.draw();
      return;
    }
    const n = this.count;
    const { x, y } = this.data;
    this.px = new Float32Array(n);
    this.py = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      this.px[i] = PAD + x[i] * (width - 2 * PAD);
      this.py[i] = PAD + (1 - y[i]) * (height - 2 * PAD); // y grows upwards on the map, downwards on screen
    }
    this.buildGrid();
    this.renderBase();
    this.draw();
  }

  buildGrid() {
    // the points sorted by cell (a counting sort): cell c holds items[start[c] .. start[c + 1])
    const cols = Math.ceil(this.width / CELL) + 1;
    const rows = Math.ceil(this.height / CELL) + 1;
    const start = new Uint32Array(cols * rows + 1);
    const cell = new Uint32Array(this.count);
    for (let i = 0; i < this.count; i++) {
      cell[i] = Math.floor(this.py[i] / CELL) * cols + Math.floor(this.px[i] / CELL);
      start[cell[i] + 1]++;
    }
    for (let c = 0; c < cols * rows; c++) start[c + 1] += start[c];
    const fill = start.slice(0, cols * rows);
    const items = new Uint32Array(this.count);
    for (let i = 0; i < this.count; i++) items[fill[cell[i]]++] = i;
    this.grid = { cols, rows, start, items };
  }

  renderBase() {
    const w = this.canvas.width;
    const h = this.canvas.height;
    const image = new ImageData(w, h);
    const pixels = new Uint32Array(image.data.buffer);
    const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
    const packed = new Map();
    const pack = (hex) => {
      if (!packed.has(hex)) {
        const [r, g, b] = rgb(hex);
        // ImageData is RGBA in memory: as one 32-bit word, that is ABGR on little-endian machines
        const word = little ? (255 << 24) | (b << 16) | (g << 8) | r : (r << 24) | (g << 16) | (b << 8) | 255;
        packed.set(hex, word >>> 0);
      }
      return packed.get(hex);
    };
    const size = Math.max(1, Math.round((this.count > 20000 ? 2 : 4) * this.dpr));
    const half = Math.floor(size / 2);
    for (let i = 0; i < this.count; i++) {
      const color = pack(this.colorOf(i));
      const cx = Math.round(this.px[i] * this.dpr) - half;
      const cy = Math.round(this.py[i] * this.dpr) - half;
      for (let dy = 0; dy < size; dy++) {
        const row = cy + dy;
        if (row < 0 || row >= h) continue;
        for (let dx = 0; dx < size; dx++) {
          const col = cx + dx;
          if (col >= 0 && col < w) pixels[row * w + col] = color;
        }
      }
    }
    this.base = image;
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.base) return;
    ctx.putImageData(this.base, 0, 0);
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    const style = getComputedStyle(this.canvas);
    const ink = style.getPropertyValue("--ink").trim();
    const accent = style.getPropertyValue("--accent").trim();

    if (this.chosen.length) {
      // a frame round each selected point, its colour still showing
      ctx.beginPath();
      for (const i of this.chosen) ctx.rect(this.px[i] - 3.5, this.py[i] - 3.5, 7, 7);
      ctx.strokeStyle = ink;
      ctx.lineWidth = 1.5;
      ctx.stroke();
    }

    if (this.highlighted.length) {
      // rings, so the point's own colour (its folder or tag) still shows inside
      ctx.beginPath();
      for (const i of this.highlighted) {
        ctx.moveTo(this.px[i] + 6, this.py[i]);
        ctx.arc(this.px[i], this.py[i], 6, 0, 2 * Math.PI);
      }
      ctx.strokeStyle = accent;
      ctx.lineWidth = 2;
      ctx.stroke();
    }

    if (this.hovered >= 0) {
      ctx.beginPath();
      ctx.arc(this.px[this.hovered], this.py[this.hovered], 7, 0, 2 * Math.PI);
      ctx.strokeStyle = ink;
      ctx.lineWidth = 2;
      ctx.stroke();
    }

    if (this.drag?.moved) {
      ctx.beginPath();
      this.drag.points.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.fillStyle = accent;
      ctx.globalAlpha = 0.12;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = ink;
      ctx.lineWidth = 1;
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  /** The point nearest to (x, y) in CSS px within REACH, or -1. */
  nearest(x, y) {
    if (!this.grid) return -1;
    const { cols, rows, start, items } = this.grid;
    const cx = Math.floor(x / CELL);
    const cy = Math.floor(y / CELL);
    let best = -1;
    let bestDistance = REACH * REACH;
    for (let gy = Math.max(0, cy - 1); gy <= Math.min(rows - 1, cy + 1); gy++) {
      for (let gx = Math.max(0, cx - 1); gx <= Math.min(cols - 1, cx + 1); gx++) {
        const c = gy * cols + gx;
        for (let k = start[c]; k < start[c + 1]; k++) {
          const i = items[k];
          const d = (this.px[i] - x) ** 2 + (this.py[i] - y) ** 2;
          if (d <= bestDistance) {
            bestDistance = d;
            best = i;
          }
        }
      }
    }
    return best;
  }

  local(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  pointerdown(event) {
    if (event.button !== 0 || !this.data) return;
    this.canvas.setPointerCapture(event.pointerId);
    this.drag = { points: [this.local(event)], moved: false, additive: event.shiftKey };
  }

  pointermove(event) {
    const [x, y] = this.local(event);
    if (this.drag) {
      const [x0, y0] = this.drag.points[0];
      const [xl, yl] = this.drag.points[this.drag.points.length - 1];
      if (!this.drag.moved && Math.hypot(x - x0, y - y0) > 4) this.drag.moved = true;
      if (Math.hypot(x - xl, y - yl) > 2) this.drag.points.push([x, y]);
      if (this.drag.moved) this.draw();
      return;
    }
    this.hover(this.nearest(x, y), x, y);
  }

  pointerup(event) {
    const drag = this.drag;
    this.drag = null;
    if (!drag) return;
    if (drag.moved && drag.points.length >= 3) {
      this.selectInside(drag.points, drag.additive);
    } else {
      const [x, y] = this.local(event);
      const i = this.nearest(x, y);
      if (i >= 0) this.onPick(this.data.ids[i]);
      this.draw();
    }
  }

  selectInside(polygon, additive) {
    const xs = polygon.map((p) => p[0]);
    const ys = polygon.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const inside = [];
    for (let i = 0; i < this.count; i++) {
      const x = this.px[i];
      const y = this.py[i];
      if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && insidePolygon(x, y, polygon)) inside.push(i);
    }
    this.select(inside, additive);
  }

  /** Select these point indices (added to the selection with `additive`). */
  select(indices, additive) {
    if (!additive) this.selected.fill(0);
    for (const i of indices) this.selected[i] = 1;
    this.chosen = [];
    for (let i = 0; i < this.count; i++) if (this.selected[i]) this.chosen.push(i);
    this.draw();
    this.onSelection(this.chosen);
  }

  selectIds(ids, additive = false) {
    this.select(ids.map((id) => this.indexOfId.get(id)).filter((i) => i !== undefined), additive);
  }

  hover(i, x, y) {
    if (i === this.hovered) return;
    this.hovered = i;
    clearTimeout(this.hoverTimer);
    if (i < 0) {
      this.tip.hidden = true;
    } else {
      const folder = this.data.folders?.[i];
      this.tip.textContent = folder && folder !== "." ? `${this.data.names[i]} · ${folder}` : this.data.names[i];
      this.tip.hidden = false;
      this.tip.style.left = `${Math.min(x + 12, this.width - this.tip.offsetWidth - 4)}px`;
      this.tip.style.top = `${y + 12}px`;
      const id = this.data.ids[i];
      this.hoverTimer = setTimeout(() => {
        this.player.play(id, 0, { length: PREVIEW_SECONDS }).catch(() => {});
      }, HOVER_DELAY_MS);
    }
    this.draw();
  }

  leave() {
    if (this.drag) return;
    this.hover(-1, 0, 0);
    this.player.stopPreview();
  }
}
