"""RN50 pre-training steps at 224 px on one device: the pipeline's step fed by its loader (JPEG shards
decoded in N loader processes, pinned, copied asynchronously, channels_last, bf16 autocast on GPUs)
against a bare loop of the same model, objective and optimiser on batches already on the device.
The ratio is what data loading and our plumbing cost; peak GPU memory is reported for both.

    python benchmarks/gpu_train.py [--batch 256] [--steps 20] [--loader-workers 12] [--compile]
    python benchmarks/gpu_train.py --dry-run      # CPU, batch 4, 2 steps: checks the script runs

Baseline: the bare loop (no decoding). Goal on a GPU: ours >= 0.9x the bare loop's samples/s.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.loader import write_shards  # noqa: E402
from core.data.loader import BatchStream  # noqa: E402
from core.model import (  # noqa: E402
    DualEncoder, build_model, for_device, forward_backward, make_optimizer, optimizer_step, schedule, to_device,
)
from objectives.registry import get_objective  # noqa: E402


def steps_per_s(model, objective, batches, device, steps: int, autocast, warmup: int, compile: bool) -> float:
    optimizer = make_optimizer(model, 1e-4, 0.1, False)
    scheduler = schedule(optimizer, 0, steps + warmup)
    wrapper = torch.compile(DualEncoder(model)) if compile else DualEncoder(model)
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        forward_backward(wrapper, objective, [to_device(batch, device)], autocast)
        optimizer_step(model, optimizer, scheduler)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loader-workers", type=int, default=12)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        args.batch, args.steps, args.loader_workers = 4, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    warmup = 1 if args.dry_run else 3
    n = args.batch * (args.steps + warmup)
    print(f"RN50 224 px, batch {args.batch}, {args.steps} timed steps after {warmup}, device {device}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, {args.loader_workers} loader "
          f"processes, {os.cpu_count()} cores, compile {args.compile}")
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "s", n, max(1, n // 16))
        for name in ("mmcl", "mmcl_ssl"):
            objective = get_objective(name)
            results = {}
            for kind in ("bare", "ours"):
                torch.manual_seed(0)
                model, preprocess, tokenizer = build_model("RN50", name)
                model = for_device(model, device)
                stream = BatchStream(Path(tmp) / "s", args.batch, 0, 1, 0, preprocess, tokenizer, objective.views,
                                     loader_workers=0 if kind == "bare" else args.loader_workers,
                                     pin_memory=device.type == "cuda")
                if kind == "bare":  # one real batch, decoded once and kept on the device
                    batch = to_device(next(iter(stream.epoch(0, n_batches=1))), device) | {"keys": []}
                    batches = (batch for _ in range(args.steps + warmup))
                else:
                    batches = stream.epoch(0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rate = steps_per_s(model, objective, batches, device, args.steps, autocast, warmup, args.compile)
                peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"
                results[kind] = rate
                print(f"{name:9s} {kind:5s}: {rate:6.2f} steps/s = {rate * args.batch:7.0f} samples/s, peak GPU memory {peak}")
            print(f"{name:9s} ours / bare: {results['ours'] / results['bare']:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
