"""The run's record: `log.jsonl` (one JSON object per event), TensorBoard scalars when installed, and a
callback for whatever displays progress (the CLI's progress bar or plain lines)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


class RunLog:
    def __init__(self, run_dir: Path, display: Callable[[dict], None] | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        self.display = display or (lambda record: None)
        self.enabled = enabled  # False on every rank but 0
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key in ("loss", "lr", "logit_scale", "samples_per_s"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], record["step"])
            for key, value in (record.get("val") or {}).items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"val/{key}", value, record["step"])
        self.display(record)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
