// A file's waveform on a canvas, from /api/peaks: [min, max] per bucket, the best-matching 10 s window
// shaded, the per-window similarity of a long file as a strip under it, and the playhead while it plays.

import { getJson } from "./api.js";

const peaksCache = new Map(); // id → Promise of {duration, peaks}
const STRIP = 6; // CSS px of the per-window similarity strip

export function loadPeaks(id, buckets) {
  const key = `${id}:${buckets}`;
  if (!peaksCache.has(key)) {
    const pending = getJson(`api/peaks/${id}`, { n: buckets });
    pending.catch(() => peaksCache.delete(key)); // a failed fetch is tried again next time
    peaksCache.set(key, pending);
  }
  return peaksCache.get(key);
}

export function forgetPeaks() {
  peaksCache.clear();
}

function themeColor(element, name) {
  return getComputedStyle(element).getPropertyValue(name).trim();
}

/** Draw the waveform of `hit` into `canvas`. `peaks` may be null (still loading); `playhead` in seconds or null. */
export function drawWaveform(canvas, hit, peaks, playhead) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const duration = hit.duration || peaks?.duration || 0;
  const hasStrip = hit.windows && hit.windows.length > 0;
  const waveHeight = hasStrip ? height - STRIP - 2 : height;
  const x = (t) => (duration > 0 ? (t / duration) * width : 0);

  if (hit.start !== null && hit.start !== undefined && duration > 0) {
    ctx.fillStyle = themeColor(canvas, "--window");
    ctx.fillRect(x(hit.start), 0, Math.max(1, x(hit.end) - x(hit.start)), waveHeight);
  }

  const mid = waveHeight / 2;
  ctx.fillStyle = themeColor(canvas, hit.missing ? "--muted" : "--wave");
  if (peaks && peaks.peaks.length) {
    const n = peaks.peaks.length;
    const columns = Math.max(1, Math.floor(width));
    for (let col = 0; col < columns; col++) {
      // the buckets under this pixel column: their lowest min and highest max
      const from = Math.floor((col / columns) * n);
      const to = Math.max(from + 1, Math.floor(((col + 1) / columns) * n));
      let lo = 0;
      let hi = 0;
      for (let i = from; i < to && i < n; i++) {
        lo = Math.min(lo, peaks.peaks[i][0]);
        hi = Math.max(hi, peaks.peaks[i][1]);
      }
      const top = mid - hi * mid;
      ctx.fillRect(col, top, 1, Math.max(1, (hi - lo) * mid));
    }
  } else {
    ctx.fillRect(0, mid, width, 1);
  }

  if (hasStrip) {
    const scores = hit.windows.map((w) => w[2]);
    const lo = Math.min(...scores);
    const span = Math.max(...scores) - lo || 1;
    const accent = themeColor(canvas, "--accent-rgb");
    hit.windows.forEach(([start, end, score], i) => {
      // overlapping windows: each one owns the stretch up to where the next one starts
      const until = i + 1 < hit.windows.length ? Math.min(end, hit.windows[i + 1][0]) : end;
      ctx.fillStyle = `rgba(${accent}, ${0.12 + 0.88 * ((score - lo) / span)})`;
      ctx.fillRect(x(start), height - STRIP, Math.max(1, x(until) - x(start)), STRIP);
    });
  }

  if (playhead !== null && duration > 0) {
    ctx.fillStyle = themeColor(canvas, "--playhead");
    ctx.fillRect(Math.min(width - 2, x(playhead)), 0, 2, height);
  }
}

/** The time (seconds) under a click at clientX on the waveform canvas. */
export function timeAt(canvas, clientX, duration) {
  const rect = canvas.getBoundingClientRect();
  const fraction = Math.min(1, Math.max(0, (clientX - rect.left) / rect.width));
  return fraction * duration;
}
