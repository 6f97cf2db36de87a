"""Shared bits of the benchmark scripts: paths, machine description, timing and table helpers.

Run the scripts from the repository root as modules (`python -m benchmarks.bench_index`), so that
`tests.audio_synth` and `tests.tiny_models` import without touching sys.path.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
WORK = ROOT / "benchmarks" / "_work"  # generated data and results (gitignored)
LIBRARY_DIR = WORK / "library"
MODEL_DIR = WORK / "model-fused"
RESULTS_DIR = WORK / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_info() -> dict:
    """What a reader needs to compare numbers: date, CPU, cores, torch, threads, load, bf16 support."""
    import torch

    flags = cpu_flags()
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in load_average()],
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def busy_processes(limit: int = 5) -> list[str]:
    """The top CPU users right now (from `top -bn1`), to note in the results when the load is high."""
    try:
        out = subprocess.run(["top", "-bn1", "-o", "%CPU"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("PID"):
            return [" ".join(row.split()) for row in lines[i + 1 : i + 1 + limit]]
    return []


def print_machine(info: dict) -> None:
    load = info["load_average_1_5_15"]
    print(
        f"# {info['date']}  {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"avx512_bf16={info['avx512_bf16']} amx_bf16={info['amx_bf16']}"
    )
    if load[0] > 0.5 * (info["cores"] or 1):
        print("# note: the machine is busy; numbers may be pessimistic. Top processes:")
        for row in busy_processes():
            print(f"#   {row}")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": percentile(ms, 95),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def clap_executable() -> str | None:
    """The installed `clap` entry point (next to this Python first), or None."""
    import sys

    here = Path(sys.executable).with_name("clap")
    if here.exists():
        return str(here)
    return shutil.which("clap")


def clap_has_command(command: str) -> bool:
    """True when `clap COMMAND --help` works, i.e. the command exists in this checkout."""
    exe = clap_executable()
    if exe is None:
        return False
    proc = subprocess.run([exe, command, "--help"], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def last_json_line(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object, or None."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _busy_ticks() -> int | None:
    """CPU ticks (USER_HZ) all CPUs spent busy since boot: /proc/stat minus idle and iowait."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return sum(values) - values[3] - values[4]


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children and their descendants
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMeter:
    """Wall time of a block plus how much of the machine other processes used meanwhile.

    `other_share` = (busy CPU time of the whole machine - CPU time of this process and its finished
    children) / (wall time x cores): 0 on an otherwise idle machine, 0.5 when other processes kept one
    of two cores busy. A run with a high share was slowed down by someone else.
    """

    def __enter__(self) -> "CpuMeter":
        self._ticks, self._own = _busy_ticks(), _own_cpu_seconds()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        ticks, own = _busy_ticks(), _own_cpu_seconds()
        self.own_cpu_s = own - self._own
        if ticks is None or self._ticks is None or self.seconds <= 0:
            self.other_share = float("nan")
            return
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (ticks - self._ticks) / hz
        self.other_share = max(0.0, busy - self.own_cpu_s) / (self.seconds * (os.cpu_count() or 1))


def busy_share(interval: float = 2.0) -> float:
    """Share of the machine's CPU (0..1) busy over the next `interval` seconds (we sleep meanwhile)."""
    before = _busy_ticks()
    time.sleep(interval)
    after = _busy_ticks()
    if before is None or after is None:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (after - before) / hz / (interval * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float, threshold: float = 0.15, label: str = "") -> float:
    """Sleep until other processes use less than `threshold` of the CPU (over 2 s), at most `max_wait`
    seconds. Returns the last measured share. Torch with one OpenMP thread per core is very sensitive to a
    second busy process (each parallel op then waits for a time slice), so timings are taken when quiet."""
    if max_wait <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait
    share = busy_share()
    announced = False
    while share > threshold and time.monotonic() < deadline:
        if not announced:
            print(f"#   waiting for a quiet machine{' before ' + label if label else ''} "
                  f"(other processes at {100 * share:.0f}% of the CPU) ...", flush=True)
            announced = True
        time.sleep(3.0)
        share = busy_share()
    if share > threshold:
        print(f"#   still busy after {max_wait:.0f} s ({100 * share:.0f}%): measuring anyway", flush=True)
    return share
