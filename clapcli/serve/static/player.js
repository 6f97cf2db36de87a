// The page's one <audio> element: whatever plays (a result, a seek on a waveform, a hover on the map) plays
// here, so only one sound is heard at a time.

import { audioUrl } from "./api.js";

export class Player {
  constructor(audio) {
    this.audio = audio;
    this.id = null; // the index id of the file loaded, or null
    this.stopAt = null; // a preview pauses itself at this time (seconds)
    this.preview = false;
    this.listeners = new Set();
    audio.addEventListener("timeupdate", () => {
      if (this.stopAt !== null && audio.currentTime >= this.stopAt) audio.pause();
      this.notify();
    });
    for (const type of ["play", "pause", "ended", "emptied", "seeked"]) {
      audio.addEventListener(type, () => this.notify());
    }
  }

  /** Listen to what plays: fn(player) on every change of file, position or state. Returns the unsubscribe. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  notify() {
    for (const fn of this.listeners) fn(this);
  }

  get playing() {
    return !this.audio.paused && !this.audio.ended;
  }

  get currentTime() {
    return this.audio.currentTime;
  }

  /** Play file `id` from `at` seconds; with `length`, a preview that stops after that many seconds. */
  play(id, at = 0, { length = null } = {}) {
    const audio = this.audio;
    if (this.id !== id) {
      this.id = id;
      audio.src = audioUrl(id);
    }
    this.preview = length !== null;
    this.stopAt = length === null ? null : at + length;
    const start = () => {
      audio.currentTime = at;
      return audio.play();
    };
    const playing = audio.readyState >= HTMLMediaElement.HAVE_METADATA
      ? start()
      : new Promise((resolve, reject) => {
          const loaded = () => {
            audio.removeEventListener("error", failed);
            start().then(resolve, reject);
          };
          const failed = () => {
            audio.removeEventListener("loadedmetadata", loaded);
            reject(new Error(audio.error?.message || "the server sent nothing playable"));
          };
          audio.addEventListener("loadedmetadata", loaded, { once: true });
          audio.addEventListener("error", failed, { once: true });
          audio.load();
        });
    this.notify();
    return playing.catch((err) => {
      // a newer play() or pause() interrupted this one: not an error anyone needs to see
      if (err.name !== "AbortError") throw err;
    });
  }

  toggle() {
    if (this.id === null) return false;
    if (this.playing) this.audio.pause();
    else {
      if (this.stopAt !== null && this.audio.currentTime >= this.stopAt) this.stopAt = null;
      this.audio.play().catch(() => {});
    }
    return true;
  }

  /** Stop a map preview (leaving a result that plays alone). */
  stopPreview() {
    if (this.preview) this.audio.pause();
  }
}
