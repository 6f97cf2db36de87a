"""Training throughput and peak memory: samples/s of `train_step` for the tiny and the full-size presets.

    python -m benchmarks.bench_train                    # tiny + htsat-tiny-fused, with and without checkpointing
    python -m benchmarks.bench_train --presets tiny --batch-size 16 --steps 5

Each configuration runs in its own process (peak RSS is per process), on random mel features and token ids
of the preset's shapes (decoding is not part of the step; `clap train` overlaps it in data workers). The
median step time over `--steps` timed steps after one warm-up step gives samples/s. Results go to stdout as a
markdown table and to `benchmarks/_work/results/train-*.json`; RESULTS.md records them with the conditions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks._common import RESULTS_DIR, load_average, machine_info, markdown_table, print_machine


def one(preset_name: str, batch_size: int, steps: int, checkpointing: bool, device: str) -> dict:
    import torch

    from clapcli.models.clap import ClapModel
    from clapcli.models.presets import preset
    from clapcli.train.batch import Batch
    from clapcli.train.config import TrainConfig
    from clapcli.train.loop import make_optimizer, train_step
    from clapcli.train.loss import ClipLoss

    torch.manual_seed(0)
    cfg = preset(preset_name)
    dev = torch.device(device)
    model = ClapModel(cfg).to(dev).train()
    model.set_grad_checkpointing(checkpointing)
    fe = cfg.frontend
    channels = 4 if cfg.fused else 1
    batch = Batch(
        torch.randn(batch_size, channels, fe.clip_frames, fe.n_mels) * 20 - 40,
        torch.zeros(batch_size, dtype=torch.bool),
        torch.randint(3, cfg.text.vocab_size, (batch_size, cfg.text.max_length)),
        torch.ones(batch_size, cfg.text.max_length, dtype=torch.long),
    ).to(dev)
    opt = make_optimizer(model, TrainConfig(data="", out=""))
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, batch, ClipLoss(), opt, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "preset": preset_name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch_size": batch_size,
        "grad_checkpointing": checkpointing,
        "device": device,
        "step_s_median": round(step, 3),
        "step_s_all": [round(t, 3) for t in times],
        "samples_per_s": round(batch_size / step, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None,
        "load_avg": [round(x, 2) for x in load_average()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "htsat-tiny-fused"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) and print it
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(one(**spec)))
        return 0
    info = machine_info()
    print_machine(info)
    rows, results = [], []
    for name in args.presets:
        for checkpointing in (False, True):
            spec = dict(preset_name=name, batch_size=args.batch_size, steps=args.steps, checkpointing=checkpointing,
                        device=args.device)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--one", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            rows.append([r["preset"], r["params_m"], r["batch_size"], "yes" if checkpointing else "no",
                         r["step_s_median"], r["samples_per_s"], r["peak_rss_mb"], r["peak_cuda_mb"] or "",
                         " ".join(map(str, r["load_avg"]))])
            print(rows[-1], flush=True)
    print(markdown_table(["preset", "params (M)", "batch", "grad ckpt", "step s (median)", "samples/s",
                          "peak RSS MB", "peak CUDA MB", "load avg"], rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / time.strftime("train-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
