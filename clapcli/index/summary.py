"""What one `clap index` run reports: counts, the files it skipped or embedded in part, and the state of the
index after it (`IndexSummary`, which the command renders as text or as one JSON object)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .store import LOSSY_PRECISIONS


@dataclass
class IndexSummary:
    index: str
    model: str
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    touched: int = 0  # size/mtime changed but the content hash did not: no model work
    removed: int = 0
    moved: int = 0  # new paths given a pruned file's row and vectors (renamed or moved): no model work
    copied: int = 0  # new paths given a copy of an indexed file's vectors (same content): no model work
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    audio_seconds: float = 0.0  # embedded in this run
    seconds: float = 0.0
    total_files: int = 0
    total_segments: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of every error row stored
    emptied_roots: list[tuple[str, int]] = field(default_factory=list)  # (folder, files kept): lists no audio now
    kept_aside: str | None = None  # where --rebuild moved a damaged database
    committed: int = 0  # files embedded (or recorded as unreadable) and committed in this run
    removed_excluded: int = 0  # of `removed`: indexed files that --exclude now matches
    partial: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): embedded in part, this run
    partial_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every partial row
    precisions: list[str] = field(default_factory=list)  # what the stored vectors were computed at (sorted)
    kept_unread: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable now, row kept
    forgotten: list[tuple[str, int]] = field(default_factory=list)  # (folder, files removed): --forget
    retried: int = 0  # error rows tried again although unchanged: their failure was the machine's
    environment_failures: int = 0  # of `skipped`: files that failed for an environmental reason, this run
    kept_previous: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): re-embed failed, this
    # run; the previous embeddings stay, and the next run tries again
    retry_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every error row the
    # next run tries again (environmental failures)
    excludes: list[str] = field(default_factory=list)  # the globs this run skipped (the index remembers them)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "model": self.model,
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "touched": self.touched,
            "removed": self.removed,
            "moved": self.moved,
            "copied": self.copied,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
            "audio_seconds": round(self.audio_seconds, 3),
            "seconds": round(self.seconds, 3),
            "files_per_second": round((self.added + self.updated) / self.seconds, 3) if self.seconds else 0.0,
            "audio_seconds_per_second": round(self.audio_seconds / self.seconds, 3) if self.seconds else 0.0,
            "total_files": self.total_files,
            "total_segments": self.total_segments,
            "total_errors": len(self.unreadable),
            "unreadable_files": [{"path": p, "reason": r} for p, r in self.unreadable],
            "partial": len(self.partial),
            "total_partial": len(self.partial_files),
            "partial_files": [{"path": p, "reason": r} for p, r in self.partial_files],
            "emptied_roots": [{"path": p, "kept_files": n} for p, n in self.emptied_roots],
            "kept_aside": self.kept_aside,
            "removed_excluded": self.removed_excluded,
            "excludes": list(self.excludes),
            "precisions": self.precisions,
            "reproducible": not self.lossy_precisions,
            "kept_unreadable": [{"path": p, "reason": r} for p, r in self.kept_unread],
            "forgotten": [{"path": p, "removed_files": n} for p, n in self.forgotten],
            "retried": self.retried,
            "environment_failures": self.environment_failures,
            "kept_previous": [{"path": p, "reason": r} for p, r in self.kept_previous],
            "retry_next_run": len(self.retry_files) + len(self.kept_previous),
            "retry_files": [{"path": p, "reason": r} for p, r in self.retry_files],
        }

    @property
    def lossy_precisions(self) -> list[str]:
        """The stored precisions whose vectors depend on their batch mates (bf16, int8): a resumed or
        incremental run may then hold vectors that a clean build would not reproduce exactly."""
        return [p for p in self.precisions if p in LOSSY_PRECISIONS]
