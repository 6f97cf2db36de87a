"""`clap shards make`: clips (see `sources.collect_sources`) decoded by the front end and written as shards in
the format `shards` describes, a complete shard at a time."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UsageError, first_line
from .shards import (CAPTIONS_FROM_TAGS, DEFAULT_SHARD_SIZE, SHARD_SAMPLE_RATE, SIZES_FILE, image_embedding_vector,
                     list_shards, open_image)
from .sources import SourceItem, collect_sources


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(index: int, path: str | os.PathLike) -> str:
    """A stable, unique, tar-safe key: the zero-padded position in the source list and the file's stem with
    every character outside [A-Za-z0-9_-] (dots included: webdataset splits at the first dot) replaced by '_'."""
    stem = _UNSAFE_KEY_CHARS.sub("_", Path(path).stem).strip("_")[:48] or "clip"
    return f"{index:06d}_{stem}"


def encode_flac(samples: np.ndarray, sample_rate: int = SHARD_SAMPLE_RATE) -> bytes:
    """(T,) float32 on the int16 grid -> 16-bit mono FLAC bytes (lossless for int16-quantised audio)."""
    import soundfile as sf

    ints = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, ints, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


class ShardWriter:
    """Writes one split folder: `000000.tar`, `000001.tar`, ... of `shard_size` samples, and `sizes.json`.

    A shard is built as `NAME.tar.tmp`, fsynced and renamed to `NAME.tar` once full (or at `close`), then
    `sizes.json` is rewritten atomically, so at every moment the folder holds only complete shards and a
    `sizes.json` that lists them (a crash between the rename and the rewrite leaves one shard unlisted,
    which `clap shards info` reports).
    """

    def __init__(self, directory: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE):
        from ..atomic import atomic_write

        self._atomic_write = atomic_write
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tar.tmp"):
            stale.unlink()
        self.shard_size = max(1, int(shard_size))
        self.sizes: dict[str, int] = {}
        self.samples = 0
        self.seconds = 0.0
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._write_sizes()

    def add(self, key: str, audio: bytes, meta: dict, audio_ext: str = "flac",
            image: tuple[str, bytes] | None = None) -> None:
        """One sample: KEY.<audio_ext>, KEY.json and, with `image` = (ext, bytes), KEY.<ext>, adjacent."""
        if self._tar is None:
            self._name = f"{len(self.sizes):06d}.tar"
            self._tar = tarfile.open(self.directory / (self._name + ".tmp"), mode="w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        payload = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self._add_member(f"{key}.{audio_ext}", audio)
        self._add_member(f"{key}.json", payload)
        if image is not None:
            self._add_member(f"{key}.{image[0]}", image[1])
        self._count += 1
        self.samples += 1
        self.seconds += float(meta.get("duration", 0.0))
        if self._count >= self.shard_size:
            self._finish_shard()

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same bytes
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        tmp = self.directory / (self._name + ".tmp")
        self._tar.close()
        self._tar = None
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / self._name)
        self.sizes[self._name] = self._count
        self._write_sizes()

    def _write_sizes(self) -> None:
        self._atomic_write(self.directory / SIZES_FILE, json.dumps(self.sizes, indent=1) + "\n")

    def close(self) -> None:
        """Finish the shard in progress (if it holds anything)."""
        if self._tar is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Drop the shard in progress: its temporary file is deleted, complete shards stay."""
        if self._tar is not None:
            tmp = self.directory / (self._name + ".tmp")
            try:
                self._tar.close()
            finally:
                self._tar = None
                tmp.unlink(missing_ok=True)


@dataclass
class MakeReport:
    """What `make_shards` wrote."""

    out: str
    splits: dict[str, dict] = field(default_factory=dict)  # split -> {samples, shards, hours, directory}
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    captions_from_tags: str = "none"
    k2c_captions: int = 0  # samples given a K2C caption

    def as_dict(self) -> dict:
        return {"out": self.out, "splits": self.splits, "samples": sum(s["samples"] for s in self.splits.values()),
                "hours": round(sum(s["hours"] for s in self.splits.values()), 6),
                "shards": sum(s["shards"] for s in self.splits.values()),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "captions_from_tags": self.captions_from_tags, "k2c_captions": self.k2c_captions}


# progress(stage, total) starts a stage ("captioning", "writing") of `total` items; progress("", n) advances it by n.
Progress = Callable[[str, int], None]


JPEG_QUALITY = 95  # PNG frames are stored as JPEG at this quality


def image_member(path: str | os.PathLike) -> tuple[str, bytes]:
    """The shard member for one image file: ("jpg", bytes) for a frame (.jpg/.jpeg stored as they are, .png
    decoded and re-encoded as JPEG), ("npy", bytes) for an embedding (.npy, (D,) or (frames, D) averaged,
    stored as float32 (D,)). ValueError with the reason when the file is missing, unreadable or of another kind."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jpg", ".jpeg", ".png", ".npy"):
        raise ValueError(f"image {path.name} is not a .jpg, .png or .npy file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"image {path}: {exc.strerror or first_line(exc)}") from exc
    if suffix == ".npy":
        try:
            vector = image_embedding_vector(np.load(io.BytesIO(data), allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"image embedding {path.name}: {first_line(exc)}") from exc
        buf = io.BytesIO()
        np.save(buf, vector)
        return "npy", buf.getvalue()
    try:
        picture = open_image(data)
    except ValueError as exc:
        raise ValueError(f"image {path.name} {exc}") from exc
    if suffix == ".png":
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
    return "jpg", data


def val_indices(n: int, fraction: float, seed: int) -> set[int]:
    """Which of n items go to validation: round(n × fraction) of them (at least one when fraction > 0 and n > 1,
    never all), drawn by a permutation seeded with `seed`."""
    if fraction <= 0 or n == 0:
        return set()
    count = int(round(n * fraction))
    count = min(max(count, 1 if n > 1 else 0), n - 1)
    return {int(i) for i in np.random.default_rng(seed).permutation(n)[:count]}


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_fraction: float = 0.0,
    seed: int = 0,
    captions_from_tags: str = "none",
    k2c_model: str | None = None,
    k2c_batch_size: int = 16,
    device: str = "auto",
    workers: int = 0,
    progress: Progress | None = None,
    images: str | None = None,
) -> MakeReport:
    """Write `src` (see `collect_sources`) as shards under `out/train` (and `out/val` when `val_fraction` > 0).

    Every clip is decoded by the project's front end (48 kHz mono, int16-quantised) and stored as 16-bit
    FLAC with its JSON (`text`, `tag`, `original_path`, `duration`). Text per `captions_from_tags`:
    `none` uses the given captions only (a clip with tags but no caption is skipped); `template` makes
    "The sounds of a, b and c" for clips without a caption; `k2c` also writes `text_augment_t5` (the
    de-biased caption of `k2c_model`; clips under 2 s keep the template) and `text_augment_all` for clips
    with tags. Clips that cannot be used are skipped and listed in the report with their reason.

    `images` names a manifest column holding one image per clip (Wav2CLIP distillation data): a frame
    (.jpg/.png, stored as `KEY.jpg`) or a precomputed CLIP image embedding (.npy, stored as float32 (D,)
    `KEY.npy`; all of one run must share D). Clips then need no caption; a clip whose image is missing or
    unreadable is skipped like one whose audio is.
    """
    from ..audio.loader import iter_decoded
    from .captions import K2C_MIN_SECONDS, KeywordToCaption, template_caption

    if captions_from_tags not in CAPTIONS_FROM_TAGS:
        raise UsageError(f"--captions-from-tags must be one of {', '.join(CAPTIONS_FROM_TAGS)}, "
                         f"not {captions_from_tags!r}")
    if captions_from_tags == "k2c" and not k2c_model:
        raise UsageError("--captions-from-tags k2c needs --k2c-model NAME|DIR")
    if k2c_model and captions_from_tags != "k2c":
        raise UsageError("--k2c-model is used only with --captions-from-tags k2c")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    for split in ("train", "val"):
        d = out / split
        if d.is_dir() and (list_shards(d) or (d / SIZES_FILE).exists()):
            raise UsageError(f"{d} already holds shards; choose a new --out or delete it first")
    progress = progress or (lambda stage, n: None)

    items, skipped = collect_sources(src, captions, image_column=images)
    usable: list[tuple[int, SourceItem]] = []
    for i, item in enumerate(items):
        if images is not None:
            if item.image is None:
                skipped.append((str(item.path), f"no image in column {images!r} of {item.origin}"))
            else:
                usable.append((i, item))
        elif item.text is None and not item.tags:
            where = f" in {item.origin}" if item.origin else " (no .txt/.json sidecar)"
            skipped.append((str(item.path), f"no caption or tags{where}"))
        elif item.text is None and captions_from_tags == "none":
            skipped.append((str(item.path), "tags but no caption: use --captions-from-tags template or k2c"))
        else:
            usable.append((i, item))

    k2c_text: dict[int, str] = {}
    if captions_from_tags == "k2c":
        from ..audio.decode import probe
        from ..errors import AudioDecodeError

        wanted = []
        for i, item in usable:
            if not item.tags:
                continue
            try:
                long_enough = probe(item.path).duration >= K2C_MIN_SECONDS
            except AudioDecodeError:
                continue  # the decoding pass below reports it
            if long_enough:
                wanted.append(i)
        k2c = KeywordToCaption(k2c_model, device=device, batch_size=k2c_batch_size)
        tags_of = {i: item.tags for i, item in usable}
        progress("captioning", len(wanted))
        generated = k2c.caption_tags([tags_of[i] for i in wanted], progress=lambda n: progress("", n))
        k2c_text = dict(zip(wanted, generated))

    val = val_indices(len(usable), val_fraction, seed)
    writers = {"train": ShardWriter(out / "train", shard_size)}
    if val:  # a fraction that rounds to no clip (a one-clip source) makes no val/ folder
        writers["val"] = ShardWriter(out / "val", shard_size)
    report = MakeReport(out=str(out), captions_from_tags=captions_from_tags)
    embedding_dim: int | None = None
    progress("writing", len(usable))
    try:
        decoded = iter_decoded([item.path for _, item in usable], SHARD_SAMPLE_RATE, quantize=True, workers=workers)
        for position, ((i, item), dec) in enumerate(zip(usable, decoded)):
            progress("", 1)
            if dec.error is not None or dec.samples is None:
                skipped.append((str(item.path), dec.error or "no audio"))
                continue
            image = None
            if item.image is not None:
                try:
                    image = image_member(item.image)
                except ValueError as exc:
                    skipped.append((str(item.path), str(exc)))
                    continue
                if image[0] == "npy":
                    dim = int(np.load(io.BytesIO(image[1])).shape[0])
                    if embedding_dim is not None and dim != embedding_dim:
                        skipped.append((str(item.path), f"image embedding {item.image.name} has {dim} values, the "
                                                        f"earlier ones {embedding_dim}"))
                        continue
                    embedding_dim = dim
            duration = len(dec.samples) / SHARD_SAMPLE_RATE
            meta: dict = {"original_path": str(item.path), "duration": round(duration, 6)}
            if item.image is not None:
                meta["original_image"] = str(item.image)
            if item.tags:
                meta["tag"] = list(item.tags)
            text = item.text
            if text is None and item.tags and captions_from_tags != "none":
                text = template_caption(item.tags)
            if text is not None:  # only image data (--images) may come without any text
                meta["text"] = text
            if captions_from_tags == "k2c" and item.tags:
                t5 = k2c_text.get(i) if duration >= K2C_MIN_SECONDS else None
                if t5 is not None:
                    report.k2c_captions += 1
                meta["text_augment_t5"] = t5 if t5 is not None else template_caption(item.tags)
                meta["text_augment_all"] = ([text] if isinstance(text, str) else list(text)) + [meta["text_augment_t5"]]
            writer = writers["val" if position in val else "train"]
            writer.add(sample_key(i, item.path), encode_flac(dec.samples), meta, image=image)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for name, writer in writers.items():
        report.splits[name] = {"directory": str(writer.directory), "samples": writer.samples,
                               "shards": len(writer.sizes), "hours": round(writer.seconds / 3600, 6)}
    report.skipped = skipped
    return report
