"""Label sets: the built-in dataset class lists, a label file (`@labels.txt`) or a comma-separated list."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UsageError

# Built-in sets, in the order `clap tag --list-labelsets` shows them; each is labelsets/<name>.txt.
BUILTIN_NAMES = ("esc50", "urbansound8k", "audioset", "fsd50k", "vggsound")


class LabelSetError(UsageError):
    """A label set could not be resolved: unknown name, unreadable file, empty or duplicate labels."""


@dataclass(frozen=True)
class LabelSet:
    name: str  # built-in name, the label file's stem, or "custom" for a comma-separated list
    labels: list[str]  # class names; index i is class i

    def __post_init__(self) -> None:
        _check_labels(self.labels, [f"label {i + 1}" for i in range(len(self.labels))])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def content_hash(self) -> str:
        """sha256 of the labels in order: two sets with the same labels share cached text embeddings."""
        return hashlib.sha256(json.dumps(self.labels, ensure_ascii=False).encode("utf-8")).hexdigest()


def builtin_labelsets() -> dict[str, int]:
    """Name → number of labels of every built-in set."""
    return {name: len(_read_builtin(name)) for name in BUILTIN_NAMES}


def resolve_labels(spec: str) -> LabelSet:
    """A built-in set name (`esc50`), a label file (`@path/labels.txt`), a comma list (`dog,rain,siren`) or
    one custom label (`dog`).

    A single word that is nearly a built-in name (`esc-50`, `AudioSet `, `urbansound`) is refused with a
    hint rather than taken as one label, which would score every file 1.0; `@FILE` holds such a label.
    """
    spec = spec.strip()
    if not spec:
        raise LabelSetError(f"no labels given; use a built-in set ({_builtin_list()}), @FILE or a comma list")
    if spec.startswith("@"):
        return _read_label_file(Path(spec[1:]).expanduser())
    if spec.lower() in BUILTIN_NAMES:
        name = spec.lower()
        return LabelSet(name, list(_read_builtin(name)))
    if "," in spec:
        labels = [part.strip() for part in spec.split(",")]
        _check_labels(labels, [f"item {i + 1} of the comma list" for i in range(len(labels))])
        return LabelSet("custom", labels)
    near = _near_builtin(spec)
    if near is not None:
        raise LabelSetError(
            f"unknown label set {spec!r}: did you mean {near}? built-in sets: {_builtin_list()} "
            "(a label of that name goes in @FILE, one label per line)"
        )
    return LabelSet("custom", [spec])


def _near_builtin(spec: str) -> str | None:
    """The built-in set name `spec` nearly spells (case, spaces, dashes and small typos aside), if any."""
    import difflib

    squashed = "".join(ch for ch in spec.lower() if ch.isalnum())
    if squashed in BUILTIN_NAMES:
        return squashed
    close = difflib.get_close_matches(squashed, BUILTIN_NAMES, n=1, cutoff=0.8)
    return close[0] if close else None


def _builtin_list() -> str:
    return ", ".join(f"{name} ({size})" for name, size in builtin_labelsets().items())


@functools.lru_cache(maxsize=None)
def _read_builtin(name: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("labelsets", f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _read_label_file(path: Path) -> LabelSet:
    """One label per line; blank lines and lines starting with `#` are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelSetError(f"label file not found: {path}") from None
    except IsADirectoryError:
        raise LabelSetError(f"label file is a directory: {path}") from None
    except UnicodeDecodeError as err:
        raise LabelSetError(f"label file is not UTF-8 text: {path} ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise LabelSetError(f"cannot read label file {path}: {err.strerror}") from None
    labels, where = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        label = line.strip()
        if not label or label.startswith("#"):
            continue
        labels.append(label)
        where.append(f"{path}:{lineno}")
    if not labels:
        raise LabelSetError(f"label file has no labels: {path}")
    _check_labels(labels, where)
    return LabelSet(path.stem, labels)


def _check_labels(labels: list[str], where: list[str]) -> None:
    """Reject an empty set, empty labels and duplicates, naming where each offender is."""
    if not labels:
        raise LabelSetError("a label set needs at least one label")
    for label, place in zip(labels, where):
        if not isinstance(label, str) or not label.strip():
            raise LabelSetError(f"empty label ({place})")
    first_seen: dict[str, str] = {}
    duplicates = []
    for label, place in zip(labels, where):
        key = label.strip()
        if key in first_seen:
            duplicates.append(f"{key!r} ({first_seen[key]} and {place})")
        else:
            first_seen[key] = place
    if duplicates:
        raise LabelSetError("duplicate labels: " + "; ".join(duplicates))
