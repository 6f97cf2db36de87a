"""`clap shards info`: what a folder of shards holds (samples, hours, text and image members) and what is wrong
with it, read without decoding more than it must."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, first_line
from .shards import SIZES_FILE, caption_list, decode_image_embedding, iter_shard, list_shards, read_sizes


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
                                                 f"({first_line(exc)})")
                            duration = 0.0
                    info.seconds += float(duration)
                    text = caption_list(raw.meta.get("text"))
                    info.with_text += bool(text)
                    info.with_tag += bool(caption_list(raw.meta.get("tag")))
                    info.with_t5 += bool(caption_list(raw.meta.get("text_augment_t5")))
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
