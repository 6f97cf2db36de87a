"""Webdataset shards in the LAION-CLAP format: the reader the trainer and `clap eval` use, and the writer
behind `clap shards make` / `clap shards info`.

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

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import DataError, UsageError

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
        raise DataError(f"cannot be opened as a tar shard ({_one_line(exc)})", source=path) from exc
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
                raise DataError(f"truncated or corrupt tar{after} ({_one_line(exc)})", source=path) from exc
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
        raise DataError(f"member {key}.json is not valid JSON ({_one_line(exc)})", source=path) from exc
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
        raise DataError(f"cannot be decoded ({_one_line(exc)})", **where) from exc
    except MemoryError as exc:
        raise DataError(out_of_memory(exc), **where) from exc
    if len(data) == 0:
        raise DataError("contains no audio frames", **where)
    try:
        return to_model_rate(data, sr, sample_rate, quantize=quantize)
    except ValueError as exc:  # a sample rate no audio has (a damaged header)
        raise DataError(f"cannot be decoded ({_one_line(exc)})", **where) from exc
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
        raise DataError(f"is not a .npy array ({_one_line(exc)})", source=raw.url or None, member=member) from exc
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
        raise ValueError(f"cannot be decoded as an image ({_one_line(exc)})") from exc


def _captions(value) -> list[str]:
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
    text = _captions(meta.get("text"))
    if source == "k2c":
        chosen = _captions(meta.get("text_augment_t5")) or text
    elif source == "all":
        chosen = _captions(meta.get("text_augment_all")) or text + _captions(meta.get("text_augment_t5"))
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
        raise DataError(f"cannot be read ({_one_line(exc)})", source=str(path)) from exc
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


# --------------------------------------------------------------------------------------------------- checking


@dataclass
class SplitInfo:
    """What `inspect_shards` found in one split folder."""

    name: str  # "train", "val", or the folder's name
    directory: str
    shards: int = 0  # tar files present
    samples: int = 0  # samples read from them
    seconds: float = 0.0  # total audio duration
    with_text: int = 0  # samples with a non-empty `text`
    with_tag: int = 0  # samples with a non-empty `tag` list
    with_t5: int = 0  # samples with `text_augment_t5`
    with_frame: int = 0  # samples with an image frame (`KEY.jpg`, Wav2CLIP data)
    with_embedding: int = 0  # samples with a precomputed image embedding (`KEY.npy`)
    embedding_dims: list[int] = field(default_factory=list)  # the distinct widths D of those embeddings
    examples: list[str] = field(default_factory=list)  # a few captions, from the first samples
    problems: list[str] = field(default_factory=list)  # one line each: which shard, what is wrong

    def as_dict(self) -> dict:
        return {"split": self.name, "directory": self.directory, "shards": self.shards, "samples": self.samples,
                "hours": round(self.seconds / 3600, 6), "with_text": self.with_text, "with_tag": self.with_tag,
                "with_text_augment_t5": self.with_t5, "with_image_frame": self.with_frame,
                "with_image_embedding": self.with_embedding, "image_embedding_dims": self.embedding_dims,
                "examples": self.examples, "problems": self.problems}


def split_dirs(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, folder) of each split under `path`: train/ and val/ of a `shards make` output, or `path` itself."""
    root = Path(path)
    if not list_shards(root) and (root / "train").is_dir():
        return [(name, root / name) for name in ("train", "val") if (root / name).is_dir()]
    return [(root.name or str(root), root)]


def inspect_shards(path: str | os.PathLike, examples: int = 3) -> list[SplitInfo]:
    """Read every shard under `path` (see `split_dirs`) and check it against sizes.json.

    Problems (a shard that does not open or pair up, a count that differs from sizes.json, a shard missing
    from it or named there but absent) are collected per split, never raised, so one report lists them all.
    """
    import soundfile as sf

    root = Path(path)
    if not root.is_dir():
        raise DataError("not a folder of shards", source=str(root))
    report = []
    for name, directory in split_dirs(root):
        info = SplitInfo(name=name, directory=str(directory))
        tars = list_shards(directory)
        info.shards = len(tars)
        try:
            sizes = read_sizes(directory)
        except DataError as exc:
            sizes = None
            info.problems.append(str(exc))
        if sizes is not None:
            names = {t.name for t in tars}
            for missing in sorted(n for n in sizes if n not in names):
                info.problems.append(f"{directory / missing}: named in {SIZES_FILE} but missing")
            for extra in sorted(names - sizes.keys()):
                info.problems.append(f"{directory / extra}: not listed in {SIZES_FILE}")
        elif not tars:
            info.problems.append(f"{directory}: no .tar shards")
        for tar in tars:
            count = 0
            try:
                for raw in iter_shard(tar):
                    count += 1
                    duration = raw.meta.get("duration")
                    for ext, reason in raw.unread.items():
                        if ext in (raw.audio_ext, raw.image_ext):
                            info.problems.append(f"{tar}: {raw.key}.{ext}: {reason}")
                    if raw.audio_ext in raw.unread:
                        duration = 0.0
                    elif not isinstance(duration, (int, float)) or isinstance(duration, bool):
                        try:
                            duration = sf.info(io.BytesIO(raw.audio_bytes)).duration
                        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
                            info.problems.append(f"{tar}: {raw.key}.{raw.audio_ext}: unreadable audio "
                                                 f"({_one_line(exc)})")
                            duration = 0.0
                    info.seconds += float(duration)
                    text = _captions(raw.meta.get("text"))
                    info.with_text += bool(text)
                    info.with_tag += bool(_captions(raw.meta.get("tag")))
                    info.with_t5 += bool(_captions(raw.meta.get("text_augment_t5")))
                    if raw.image_ext == "npy":
                        info.with_embedding += 1
                        try:
                            dim = int(decode_image_embedding(raw).shape[0])
                        except DataError as exc:
                            info.problems.append(str(exc))
                        else:
                            if dim not in info.embedding_dims:
                                info.embedding_dims.append(dim)
                    elif raw.image_ext is not None:
                        info.with_frame += 1
                    if text and len(info.examples) < examples:
                        info.examples.append(text[0])
            except DataError as exc:
                info.problems.append(str(exc))
                info.samples += count
                continue
            info.samples += count
            if sizes is not None and tar.name in sizes and sizes[tar.name] != count:
                info.problems.append(f"{tar}: {SIZES_FILE} says {sizes[tar.name]} samples, the shard holds {count}")
        if len(info.embedding_dims) > 1:
            info.problems.append(f"{directory}: image embeddings of different widths "
                                 f"({', '.join(map(str, sorted(info.embedding_dims)))})")
        report.append(info)
    return report


# --------------------------------------------------------------------------------------------------- sources


@dataclass
class SourceItem:
    """One clip to put in the shards, with what is known about its text."""

    path: Path  # absolute
    text: str | list[str] | None = None  # given caption(s)
    tags: list[str] | None = None  # given tags
    origin: str = ""  # where the caption came from ("manifest.csv:12", "x.txt"), for messages
    image: Path | None = None  # with an image column: the row's image (.jpg/.png frame or .npy embedding)


MANIFEST_SUFFIXES = (".csv", ".jsonl")


def _parse_caption(value) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        caps = [str(v).strip() for v in value if str(v).strip()]
        return (caps[0] if len(caps) == 1 else caps) or None
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(parsed, list):
            return _parse_caption(parsed)
    return text or None


def _parse_tags(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        tags = [str(v).strip() for v in value if str(v).strip()]
        return tags or None
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return _parse_tags(parsed)
    tags = [t.strip() for t in text.split(";") if t.strip()]
    return tags or None


def _row_text(row: dict) -> tuple[str | list[str] | None, list[str] | None]:
    caption = row.get("caption", row.get("text"))
    tags = row.get("tags", row.get("tag"))
    return _parse_caption(caption), _parse_tags(tags)


def read_manifest(path: str | os.PathLike, base: str | os.PathLike | None = None,
                  image_column: str | None = None) -> list[SourceItem]:
    """Rows of a CSV (`path` column, `caption` and/or `tags` columns) or JSONL manifest (the same keys).

    A caption is a string or a JSON list of strings; tags are a JSON list or `;`-separated. `text` and `tag`
    are accepted as the column names too. With `image_column`, each row's image path is read from that column
    (a manifest without the column is a DataError; an empty cell leaves `image` None). Relative paths resolve
    against `base` (default: the manifest's folder). A malformed manifest is a DataError naming the file and line.
    """
    manifest = Path(path)
    base = Path(base) if base is not None else manifest.resolve().parent
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UsageError(f"{manifest}: a manifest must be .csv or .jsonl")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot be read ({_one_line(exc)})", source=str(manifest)) from exc
    rows: list[tuple[int, dict]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError("needs a 'path' column (and 'caption' and/or 'tags')", source=str(manifest))
        if image_column is not None and image_column not in reader.fieldnames:
            raise DataError(f"has no column {image_column!r} (--images); its columns: {', '.join(reader.fieldnames)}",
                            source=str(manifest))
        rows = [(reader.line_num, dict(r)) for r in reader]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {number}: not valid JSON ({_one_line(exc)})", source=str(manifest)) from exc
            if not isinstance(row, dict):
                raise DataError(f"line {number}: not a JSON object", source=str(manifest))
            rows.append((number, row))
    items = []
    for number, row in rows:
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"line {number}: no 'path'", source=str(manifest))
        p = Path(value.strip()).expanduser()
        caption, tags = _row_text(row)
        image = None
        if image_column is not None:
            if suffix == ".jsonl" and image_column not in row:
                raise DataError(f"line {number}: no {image_column!r} key (--images)", source=str(manifest))
            cell = row.get(image_column)
            if isinstance(cell, str) and cell.strip():
                image = Path(cell.strip()).expanduser()
                image = image if image.is_absolute() else base / image
        items.append(SourceItem(path=p if p.is_absolute() else base / p, text=caption, tags=tags,
                                origin=f"{manifest.name}:{number}", image=image))
    return items


def _sidecar(audio: Path) -> tuple[str | list[str] | None, list[str] | None, str]:
    txt, js = audio.with_suffix(".txt"), audio.with_suffix(".json")
    if js.is_file():
        try:
            row = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"sidecar is not valid JSON ({_one_line(exc)})", source=str(js)) from exc
        if not isinstance(row, dict):
            raise DataError("sidecar must hold a JSON object with text/caption and/or tags", source=str(js))
        caption, tags = _row_text(row)
        return caption, tags, js.name
    if txt.is_file():
        try:
            lines = [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot be read ({_one_line(exc)})", source=str(txt)) from exc
        return (lines[0] if len(lines) == 1 else lines) or None, None, txt.name
    return None, None, ""


def collect_sources(src: str | os.PathLike, captions: str | os.PathLike | None = None,
                    image_column: str | None = None) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """The clips of `src` with their text, and (path, reason) of those that have to be skipped now.

    - `src` a .csv/.jsonl manifest: its rows, in order; relative paths resolve against the manifest's folder.
    - `src` a folder: its audio files (recursively, sorted). Their text comes from the `captions` manifest
      when given (rows matched by path; relative paths there resolve against `src`; files without a row are
      skipped), else from sidecars `x.json` (`text`/`caption` and/or `tags`) or `x.txt` (one caption per
      line; several lines give a list).

    `image_column` (`--images`) reads each clip's image from that manifest column, so it needs a manifest.
    """
    source = Path(src)
    if source.is_file():
        if captions is not None:
            raise UsageError("--captions is for a folder of audio; a manifest SRC carries its own captions")
        return read_manifest(source, image_column=image_column), []
    if not source.is_dir():
        raise UsageError(f"{source}: no such file or folder")
    if image_column is not None and captions is None:
        raise UsageError("--images names a manifest column: give SRC as a .csv/.jsonl manifest, or --captions")
    from ..index.scan import ScanProblem, scan

    problems: list[ScanProblem] = []
    files = [e.path for e in scan([source], problems=problems)]
    skipped = [(str(p.path), p.reason) for p in problems if not p.unread_dir]
    skipped += [(str(p.path), f"folder cannot be listed ({p.reason})") for p in problems if p.unread_dir]
    if captions is not None:
        root = source.resolve()
        by_path = {}
        for item in read_manifest(captions, base=root, image_column=image_column):
            by_path[str(item.path.resolve())] = item
        items = []
        for f in files:
            item = by_path.pop(str(f), None)
            if item is None:
                skipped.append((str(f), f"no row for it in {Path(captions).name}"))
            else:
                items.append(SourceItem(path=f, text=item.text, tags=item.tags, origin=item.origin, image=item.image))
        for path, item in by_path.items():
            skipped.append((path, f"named in {item.origin} but not an audio file under {source}"))
        return items, skipped
    items = []
    for f in files:
        try:
            caption, tags, origin = _sidecar(f)
        except DataError as exc:
            skipped.append((str(f), f"{Path(exc.source or f).name}: {exc.reason}"))
            continue
        items.append(SourceItem(path=f, text=caption, tags=tags, origin=origin))
    return items, skipped


# --------------------------------------------------------------------------------------------------- writing


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
        raise ValueError(f"image {path}: {exc.strerror or _one_line(exc)}") from exc
    if suffix == ".npy":
        try:
            vector = image_embedding_vector(np.load(io.BytesIO(data), allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"image embedding {path.name}: {_one_line(exc)}") from exc
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10_000_000 else f"{n} bytes"


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
