"""Webdataset shards in the LAION-CLAP format, and their reader: the one the trainer and `clap eval` use. The
writer behind `clap shards make` is `shard_writer` (what it reads: `sources`), `clap shards info` is `shard_info`.

Format (reference/laion_clap.md §9), the same as LAION's own tools write, so LAION-Audio-630K reads as is:

- a split folder holds tar shards and a `sizes.json` ({shard file name: sample count});
- each sample is two adjacent tar members with the same key: `KEY.flac` (48 kHz mono 16-bit; `.wav`,
  `.mp3` and `.ogg` are read too) and `KEY.json` with `text` (a caption, or a list of captions), optionally
  `tag` (list), `original_data` (source metadata), `text_augment_t5` (a keyword-to-caption caption) and
  `text_augment_all` (the `text` list plus the t5 caption). Shards written here add `original_path`
  and `duration` (seconds);
- Wav2CLIP data adds one image member per sample (`clap shards make --images`): `KEY.jpg` (a video frame,
  embedded by the CLIP teacher at training time; `.jpeg`/`.png` are read too) or `KEY.npy` (a precomputed CLIP
  image embedding, float32 (D,)). A sample then needs no caption;
- the key of a member is its name up to the first dot of its base name (webdataset's rule), so keys carry
  no dots.

`clap shards make` writes `DIR/train/` (and `DIR/val/` with a validation fraction), shards `000000.tar`,
`000001.tar`, ... of `shard_size` samples each. A shard is written as `NAME.tar.tmp` and renamed to
`NAME.tar` once complete, and `sizes.json` is rewritten (atomically) after every shard, so a run killed at
any moment leaves only complete shards that `sizes.json` describes (a reader lists `*.tar` only).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError, UsageError, first_line

# Audio member extensions a shard may use (LAION's shards are flac).
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")
FRAME_EXTENSIONS = ("jpg", "jpeg", "png")  # image members embedded by the teacher
IMAGE_EXTENSIONS = (*FRAME_EXTENSIONS, "npy")  # npy: a precomputed image embedding

SIZES_FILE = "sizes.json"
SHARD_SAMPLE_RATE = 48_000  # Hz: the rate shards are written at and the models' rate
DEFAULT_SHARD_SIZE = 512  # samples per shard, as LAION's tardir
# Bytes of one tar member read into memory: a member is read whole, so a larger one (over 45 min of 48 kHz mono
# FLAC, a damaged header or a bomb) is skipped unread and its sample is a DataError naming it.
MAX_MEMBER_BYTES = 512 << 20
TEXT_SOURCES = ("text", "k2c", "all")
CAPTIONS_FROM_TAGS = ("none", "template", "k2c")


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class RawSample:
    """One sample of a shard, undecoded."""

    key: str  # member name up to the first dot of its base name
    audio_bytes: bytes  # the audio member as stored (FLAC for shards written here)
    audio_ext: str  # "flac", "wav", "mp3" or "ogg"
    meta: dict  # the parsed KEY.json
    url: str = ""  # the shard it came from
    image_bytes: bytes | None = None  # the image member as stored (Wav2CLIP data), or None
    image_ext: str | None = None  # "jpg" (also "jpeg", "png") or "npy"
    unread: dict[str, str] = field(default_factory=dict)  # extension -> why that member was not read (its size)


@dataclass
class ShardSplit:
    """The shards of one split, as `resolve_split` found them."""

    directory: Path  # the folder holding the tars and sizes.json
    urls: list[str]  # shard paths, sorted by name
    sizes: dict[str, int]  # shard path (as in `urls`) -> samples in it, from sizes.json
    num_samples: int  # sum of sizes
    val_dir: Path | None = None  # DIR/val of a `shards make` output, when it exists


def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key = path up to the first dot of the base name, extension = the rest (lower case)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_shard(url: str | os.PathLike) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in stored order, without decoding the audio.

    Members are grouped by key as webdataset does (consecutive members with the same key form a sample);
    each sample needs exactly one audio member (`AUDIO_EXTENSIONS`) and a `KEY.json` holding a JSON object.
    Other members (`KEY.txt`, ...) are ignored, as are directories and hidden `.` / `__` names. A member over
    MAX_MEMBER_BYTES is not read: its sample comes with `unread` saying so, and decoding it is a DataError.
    Raises `DataError` naming the shard and the member for: a shard that cannot be opened, a member without
    its pair (including pairs that are not adjacent), a duplicate member, JSON that does not parse, and a
    truncated tar.
    """
    path = os.fspath(url)
    try:
        archive = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot be opened as a tar shard ({first_line(exc)})", source=path) from exc
    with archive:
        key, members = None, {}
        iterator = iter(archive)
        while True:
            try:
                info = next(iterator, None)
                if info is None:
                    break
                if not info.isfile():
                    continue
                split = _split_member_name(info.name)
                base = info.name.rpartition("/")[2]
                if split is None or base.startswith((".", "__")):
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    data = None  # the stream skips its bytes unread
                else:
                    handle = archive.extractfile(info)
                    data = handle.read() if handle is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is cut short")
            except (tarfile.TarError, EOFError, OSError) as exc:
                after = f" after sample {key}" if key is not None else ""
                raise DataError(f"truncated or corrupt tar{after} ({first_line(exc)})", source=path) from exc
            member_key, ext = split
            if member_key != key:
                if key is not None:
                    yield _sample(path, key, members)
                key, members = member_key, {}
            if ext in members:
                raise DataError(f"member {info.name} appears twice", source=path)
            members[ext] = data if data is not None else _Unread(info.size)
        # A tar cut exactly between two members reads as a shorter valid archive; only the missing
        # end-of-archive zero block tells (checked for plain tars: a compressed size says nothing).
        if getattr(archive.fileobj, "comptype", None) == "tar" and os.path.getsize(path) < archive.offset + 512:
            after = f" after sample {key}" if key is not None else ""
            raise DataError(f"truncated tar{after} (no end-of-archive marker)", source=path)
        if key is not None:
            yield _sample(path, key, members)


@dataclass(frozen=True)
class _Unread:
    """A member over MAX_MEMBER_BYTES, left unread."""

    size: int  # bytes, from the tar header

    @property
    def reason(self) -> str:
        return (f"member is {_size(self.size)}, over the {_size(MAX_MEMBER_BYTES)} a tar member may hold: "
                "skipped unread")


def _sample(path: str, key: str, members: dict[str, bytes | _Unread]) -> RawSample:
    audio = [ext for ext in AUDIO_EXTENSIONS if ext in members]
    if "json" not in members:
        names = ", ".join(f"{key}.{e}" for e in members)
        raise DataError(f"member {names} has no {key}.json beside it (members of a sample must be adjacent)",
                        source=path)
    if not audio:
        raise DataError(f"member {key}.json has no audio member ({key}.flac/.wav/.mp3/.ogg) beside it",
                        source=path)
    if len(audio) > 1:
        raise DataError(f"sample {key} has several audio members ({', '.join(audio)})", source=path)
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if len(images) > 1:
        raise DataError(f"sample {key} has several image members ({', '.join(images)})", source=path)
    if isinstance(members["json"], _Unread):
        raise DataError(f"{key}.json: {members['json'].reason}", source=path)
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"member {key}.json is not valid JSON ({first_line(exc)})", source=path) from exc
    if not isinstance(meta, dict):
        raise DataError(f"member {key}.json holds a {type(meta).__name__}, not a JSON object", source=path)
    image = images[0] if images else None
    unread = {ext: data.reason for ext, data in members.items() if isinstance(data, _Unread)}

    def read(ext: str) -> bytes:
        return b"" if ext in unread else members[ext]

    return RawSample(key=key, audio_bytes=read(audio[0]), audio_ext=audio[0], meta=meta, url=path,
                     image_bytes=read(image) if image else None, image_ext=image, unread=unread)


def decode_audio(raw: RawSample, sample_rate: int = SHARD_SAMPLE_RATE, quantize: bool = True) -> np.ndarray:
    """The sample's audio as (T,) float32 mono at `sample_rate`, int16-quantised by default.

    Decoding is the project's front end applied to the member's bytes (soundfile, then
    `clapcli.audio.decode.to_model_rate`), so a shard clip gives exactly what `load_audio` gives for the
    same FLAC file. Shards at another rate are resampled (LAION's loader does not resample: its shards are
    all 48 kHz). Several channels are averaged, like the rest of our front end; LAION's loader takes the
    first channel instead, which only differs for multi-channel shards (LAION's are mono).
    """
    import soundfile as sf

    from ..audio.decode import out_of_memory, to_model_rate

    where = dict(source=raw.url or None, member=f"{raw.key}.{raw.audio_ext}")
    if raw.audio_ext in raw.unread:
        raise DataError(raw.unread[raw.audio_ext], **where)
    try:
        data, sr = _read_member_audio(raw.audio_bytes, where)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"cannot be decoded ({first_line(exc)})", **where) from exc
    except MemoryError as exc:
        raise DataError(out_of_memory(exc), **where) from exc
    if len(data) == 0:
        raise DataError("contains no audio frames", **where)
    try:
        return to_model_rate(data, sr, sample_rate, quantize=quantize)
    except ValueError as exc:  # a sample rate no audio has (a damaged header)
        raise DataError(f"cannot be decoded ({first_line(exc)})", **where) from exc
    except MemoryError as exc:
        raise DataError(out_of_memory(exc), **where) from exc


def _read_member_audio(data: bytes, where: dict) -> tuple[np.ndarray, int]:
    """Decode audio bytes whole, block by block: ((T, C) float32, sample rate). A DataError at `where` when
    frames × channels pass decode.MAX_DECODED_BYTES, by the header or, where it does not say, by what
    decodes, before more than that is held."""
    import soundfile as sf

    from ..audio.decode import UNKNOWN_FRAMES, bounded_block_frames, decoded_size_problem

    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.frames != UNKNOWN_FRAMES and (problem := decoded_size_problem(f.frames, f.channels)):
            raise DataError(problem, **where)
        step = bounded_block_frames(f.channels, max(f.frames, 1) if f.frames != UNKNOWN_FRAMES else 1 << 20)
        blocks, frames = [], 0
        while len(block := f.read(step, dtype="float32", always_2d=True)):
            frames += len(block)
            if problem := decoded_size_problem(frames, f.channels):
                raise DataError(problem, **where)
            blocks.append(block)
        if not blocks:
            return np.zeros((0, f.channels), np.float32), f.samplerate
        return (np.concatenate(blocks) if len(blocks) > 1 else blocks[0]), f.samplerate  # (T, C)


def decode_image_embedding(raw: RawSample) -> np.ndarray:
    """The sample's precomputed image embedding (`KEY.npy`) as (D,) float32; DataError naming the member when
    it is missing, not a plain array, not one vector (an (F, D) stack of frame embeddings is averaged, as
    Wav2CLIP pooled its 30 fps frames) or not finite."""
    member = f"{raw.key}.{raw.image_ext or 'npy'}"
    if raw.image_bytes is None or raw.image_ext != "npy":
        raise DataError("has no image embedding (.npy member)", source=raw.url or None, member=raw.key)
    if "npy" in raw.unread:
        raise DataError(raw.unread["npy"], source=raw.url or None, member=member)
    try:
        array = np.load(io.BytesIO(raw.image_bytes), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"is not a .npy array ({first_line(exc)})", source=raw.url or None, member=member) from exc
    try:
        return image_embedding_vector(array)
    except ValueError as exc:
        raise DataError(str(exc), source=raw.url or None, member=member) from exc


def image_embedding_vector(array: np.ndarray) -> np.ndarray:
    """(D,) or (F, D) numeric array → (D,) float32 (frames averaged); ValueError saying what is wrong."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"holds {array.dtype} values, not an embedding")
    if array.ndim == 2 and array.shape[0] > 0:
        array = array.mean(axis=0)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"has shape {tuple(array.shape)}; an image embedding is (D,) (or (frames, D))")
    vector = array.astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise ValueError("holds NaN or infinite values")
    return vector


def decode_frame(raw: RawSample):
    """The sample's video frame (`KEY.jpg`) as an RGB PIL image; DataError naming the member when it is
    missing or cannot be decoded."""
    if raw.image_bytes is None or raw.image_ext not in FRAME_EXTENSIONS:
        raise DataError("has no image frame (.jpg member)", source=raw.url or None, member=raw.key)
    if raw.image_ext in raw.unread:
        raise DataError(raw.unread[raw.image_ext], source=raw.url or None, member=f"{raw.key}.{raw.image_ext}")
    try:
        return open_image(raw.image_bytes)
    except ValueError as exc:
        raise DataError(str(exc), source=raw.url or None, member=f"{raw.key}.{raw.image_ext}") from exc


def open_image(data: bytes):
    """JPEG/PNG bytes → a fully decoded RGB PIL image; ValueError when they are not a readable image."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError("reading image frames needs Pillow: pip install pillow (or use precomputed .npy "
                         "embeddings)") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() decodes the whole image, so a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot be decoded as an image ({first_line(exc)})") from exc


def caption_list(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def select_text(meta: dict, source: str = "text", key: str | None = None) -> list[str]:
    """The candidate captions of a sample (the trainer picks one at random per step), LAION's semantics:

    - `text`: the `text` field (a string becomes a one-item list);
    - `k2c`: `text_augment_t5`, falling back to `text` when absent;
    - `all`: `text_augment_all`, falling back to `text` plus `text_augment_t5` when present.

    A sample with no caption is a `DataError` naming `key` (pass "shard: key" for a full location).
    """
    if source not in TEXT_SOURCES:
        raise UsageError(f"unknown text source {source!r}; choose one of {', '.join(TEXT_SOURCES)}")
    text = caption_list(meta.get("text"))
    if source == "k2c":
        chosen = caption_list(meta.get("text_augment_t5")) or text
    elif source == "all":
        chosen = caption_list(meta.get("text_augment_all")) or text + caption_list(meta.get("text_augment_t5"))
    else:
        chosen = text
    if not chosen:
        fields = "'text'" if source == "text" else "'text' or augmented text"
        raise DataError(f"no caption (the JSON has no non-empty {fields})", member=key)
    return chosen


def read_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """{shard file name: count} from `directory/sizes.json`; DataError when missing or malformed."""
    path = Path(directory) / SIZES_FILE
    if not path.is_file():
        raise DataError(f"no {SIZES_FILE} (it lists the samples per shard; `clap shards make` writes it)",
                        source=str(path.parent))
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot be read ({first_line(exc)})", source=str(path)) from exc
    if not isinstance(sizes, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in sizes.items()
    ):
        raise DataError("must be a JSON object {shard name: sample count}", source=str(path))
    return {Path(k).name: v for k, v in sizes.items()}


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """The `*.tar` files of a folder, sorted by name (temporaries `*.tar.tmp` are not shards)."""
    return sorted((p for p in Path(directory).glob("*.tar") if p.is_file()), key=lambda p: p.name)


def resolve_split(path: str | os.PathLike) -> ShardSplit:
    """The training split of a data folder: a `clap shards make` output (its `train/`; `val_dir` = its `val/`
    when present) or any folder of tars with a `sizes.json` (a LAION split folder, for one).

    DataError, one line, when the folder has no tars, no or an invalid sizes.json, when sizes.json names
    shards that are not there, or when a tar is missing from sizes.json.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a folder of shards", source=str(root))
    directory, val_dir = root, None
    if not list_shards(root) and (root / "train").is_dir():
        directory = root / "train"
        val_dir = root / "val" if (root / "val").is_dir() else None
    tars = list_shards(directory)
    if not tars:
        raise DataError("no .tar shards here", source=str(directory))
    sizes = read_sizes(directory)
    names = {t.name for t in tars}
    missing = sorted(n for n in sizes if n not in names)
    if missing:
        raise DataError(f"{SIZES_FILE} names shards that are missing: {_few(missing)}", source=str(directory))
    unlisted = sorted(names - sizes.keys())
    if unlisted:
        raise DataError(f"shards not listed in {SIZES_FILE}: {_few(unlisted)}", source=str(directory))
    urls = [str(t) for t in tars]
    by_url = {str(t): sizes[t.name] for t in tars}
    return ShardSplit(directory=directory, urls=urls, sizes=by_url, num_samples=sum(by_url.values()),
                      val_dir=val_dir)


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10_000_000 else f"{n} bytes"


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
