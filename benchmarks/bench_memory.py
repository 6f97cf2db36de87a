"""Peak memory of `clap embed` and `clap index` on a short and a long file, each in its own process.

    python -m benchmarks.bench_memory                         # 10 s and 60 min, tiny fused and unfused
    python -m benchmarks.bench_memory --minutes 120 --repo /path/to/other/checkout   # e.g. the old code

Each command runs as `python -m clapcli …` in a child process; its peak resident set size comes from
`os.wait4` (the kernel's ru_maxrss of that child, decode workers included once reaped). A forked child's
ru_maxrss starts at its parent's resident size, so this script stays small: torch is imported only in
helper processes (machine description, model building), never here. The audio is a
44.1 kHz mono 16-bit WAV (so resampling runs), written block by block from a 20 s synthesised clip; the
models are the tests' tiny random checkpoints (`tests.tiny_models`), so memory is the front end's and not
the weights'. `--repo` runs another checkout's code (PYTHONPATH) for a before/after comparison. The 1-min
load average is recorded with each row: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, WORK, load_average, markdown_table, print_machine


def write_long_wav(path: Path, seconds: float, sr: int = 44_100) -> Path:
    import soundfile as sf

    from tests.audio_synth import tone_noise

    clip = tone_noise(20.0, sr, seed=7)
    left = int(round(seconds * sr))
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        while left > 0:
            f.write(clip[:left])
            left -= min(left, len(clip))
    return path


def _in_helper(code: str) -> str:
    """Run Python `code` in a helper process (from the repository root), return its stdout."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout


def tiny_models(folder: Path) -> dict[str, Path]:
    out = {}
    for name, fused, seed in (("tiny-fused", True, 1), ("tiny-unfused", False, 2)):
        d = folder / name
        if not (d / "config.json").exists():
            _in_helper(f"from tests.tiny_models import save_hf_clap; save_hf_clap({str(d)!r}, fused={fused}, "
                       f"seed={seed})")
        out[name] = d
    return out


def peak_rss(args: list[str], repo: Path, home: Path) -> tuple[float, float, int, str]:
    """Run `python -m clapcli ARGS` -> (peak RSS MB, wall seconds, exit code, stderr tail)."""
    env = dict(os.environ, PYTHONPATH=str(repo), CLAP_HOME=str(home), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        # run from `repo`: `python -m` puts the working directory before PYTHONPATH on sys.path
        proc = subprocess.Popen([sys.executable, "-m", "clapcli", *args], env=env, cwd=repo,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", "replace")[-300:]
    return usage.ru_maxrss / 1024, time.monotonic() - started, proc.returncode, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the long file (default 60)")
    ap.add_argument("--short-seconds", type=float, default=10.0)
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose clapcli runs (default: this one)")
    ap.add_argument("--models", nargs="+", default=["tiny-fused", "tiny-unfused"])
    ap.add_argument("--commands", nargs="+", default=["embed", "index"], choices=["embed", "index", "tag"])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    info = json.loads(_in_helper("import json; from benchmarks._common import machine_info; "
                                 "print(json.dumps(machine_info()))"))
    print_machine(info)
    work = WORK / "memory"
    work.mkdir(parents=True, exist_ok=True)
    models = tiny_models(work)
    tag = os.getpid()  # runs side by side do not share their files
    files = {f"{args.short_seconds:g} s": write_long_wav(work / f"short_{tag}.wav", args.short_seconds),
             f"{args.minutes:g} min": write_long_wav(work / f"long_{args.minutes:g}_{tag}.wav", args.minutes * 60)}
    rows, records = [], []
    try:
        for model in args.models:
            for command in args.commands:
                for label, path in files.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        tmp = Path(tmp)
                        cli = {"embed": ["embed", path, "--out", tmp / "e.npy"],
                               "index": ["index", path, "--index", tmp / "idx", "--json"],
                               "tag": ["tag", path, "--labels", "dog,rain", "--timeline", "--json"]}[command]
                        load = load_average()[0]
                        mb, wall, code, tail = peak_rss([*map(str, cli), "--model", str(models[model])],
                                                        args.repo, tmp / "home")
                    rec = {"model": model, "command": command, "audio": label, "peak_rss_mb": round(mb),
                           "wall_s": round(wall, 1), "exit": code, "load_avg_1min": round(load, 2)}
                    records.append(rec)
                    rows.append([model, f"clap {command}", label, f"{mb:,.0f}", f"{wall:.1f}", f"{load:.2f}",
                                 "ok" if code == 0 else f"exit {code}: {tail.strip().splitlines()[-1:]}"])
                    print(json.dumps(rec), flush=True)
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)
    import resource

    print()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"code: {args.repo}; this script's own peak RSS {own:.0f} MB")
    print(markdown_table(["model", "command", "audio", "peak RSS MB", "wall s", "load avg", "result"], rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "repo": str(args.repo), "rows": records}, indent=1))


if __name__ == "__main__":
    main()
