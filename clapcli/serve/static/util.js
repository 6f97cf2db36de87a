// Small helpers the page's modules share: formatting, the clipboard, file:// URLs, a short notice.

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(seconds / 60);
  const rest = Math.floor(seconds % 60).toString().padStart(2, "0");
  if (minutes < 60) return `${minutes}:${rest}`;
  return `${Math.floor(minutes / 60)}:${(minutes % 60).toString().padStart(2, "0")}:${rest}`;
}

export function formatRate(hz) {
  if (!hz) return "";
  return `${(hz / 1000).toLocaleString(undefined, { maximumFractionDigits: 1 })} kHz`;
}

export function formatChannels(channels) {
  return { 1: "mono", 2: "stereo" }[channels] ?? (channels ? `${channels} ch` : "");
}

export function plural(n, one, many = `${one}s`) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

export function formatAgo(unixSeconds) {
  if (!unixSeconds) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${plural(Math.floor(seconds / 60), "minute")} ago`;
  if (seconds < 86400) return `${plural(Math.floor(seconds / 3600), "hour")} ago`;
  return new Date(unixSeconds * 1000).toLocaleDateString();
}

/** A file:// URL for a local path as the index stores it (POSIX or Windows). */
export function fileUrl(path) {
  const slashed = path.replaceAll("\\", "/");
  const rooted = /^[A-Za-z]:\//.test(slashed) ? `/${slashed}` : slashed;
  const drive = (part, i) => i === 1 && /^[A-Za-z]:$/.test(part); // C: stays as it is
  const parts = rooted.split("/").map((part, i) => (drive(part, i) ? part : encodeURIComponent(part)));
  return `file://${parts.join("/")}`;
}

/** Put text on the clipboard: the Clipboard API where the page may use it, else a selected text area. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // no Clipboard API (a plain-http page off loopback) or no permission: the old way
  }
  const focused = document.activeElement;
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  area.remove();
  focused?.focus?.();
  return copied;
}

let toastTimer = null;

/** A notice at the bottom of the page for a few seconds ("Copied", a failed request). */
export function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    box.hidden = true;
  }, 2500);
}

export function debounce(fn, ms) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}
