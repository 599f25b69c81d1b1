"""Peak memory of 224 px pre-training against the size of the data: 10k vs 50k pairs.

    python benchmarks/memory.py [--pairs 10000] [--steps 3] [--loader-workers 2]

Each size runs in a fresh process what a pretrain worker does before and while it trains: the shard
check and digest (pretrain's preflight), then RN50 MMCL+SSL steps (batch 16, SSL views) fed by the loader
in `--loader-workers` processes. Peak RSS of the trainer process and of its largest loader process.
What grows with the data is what a real run would hold in memory; the steps themselves do not. Goal:
flat, <= 1.2x from 10k to 50k pairs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.loader import write_shards  # noqa: E402
from core.data.loader import BatchStream  # noqa: E402
from core.data.shards import check_shards  # noqa: E402
from core.model import DualEncoder, build_model, forward_backward, make_optimizer, optimizer_step, schedule  # noqa: E402
from objectives.registry import get_objective  # noqa: E402


def child(folder: Path, steps: int, loader_workers: int) -> dict:
    torch.set_num_threads(1)
    check_shards(folder, "pretrain.data_dir")
    model, preprocess, tokenizer = build_model("RN50", "mmcl_ssl")
    objective = get_objective("mmcl_ssl")
    optimizer = make_optimizer(model, 1e-4, 0.1, False)
    scheduler = schedule(optimizer, 0, steps)
    stream = BatchStream(folder, 16, 0, 1, 0, preprocess, tokenizer, objective.views, loader_workers=loader_workers)
    for batch in stream.epoch(0, n_batches=steps):
        forward_backward(DualEncoder(model), objective, [{k: v for k, v in batch.items() if k != "keys"}])
        optimizer_step(model, optimizer, scheduler)
    gib = 2 ** 20  # ru_maxrss is in KiB on Linux
    return {"trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gib,
            "loader": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / gib}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.steps, args.loader_workers)))
        return
    sizes = (args.pairs, 5 * args.pairs)
    print(f"RN50 MMCL+SSL at 224 px, batch 16, {args.steps} steps, {args.loader_workers} loader processes; "
          f"{sizes[0]} vs {sizes[1]} pairs (JPEGs 256-400 px, shards of 1000)")
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            write_shards(Path(tmp) / str(n), n, 1000)
            out = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / str(n)), "--steps", str(args.steps),
                                  "--loader-workers", str(args.loader_workers)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{n:6d} pairs: peak RSS trainer {peaks[-1]['trainer']:.2f} GiB, largest loader process "
                  f"{peaks[-1]['loader']:.2f} GiB")
    for part in ("trainer", "loader") if args.loader_workers else ("trainer",):
        print(f"{part}: {peaks[1][part] / peaks[0][part]:.2f}x for 5x the pairs (goal <= 1.2)")


if __name__ == "__main__":
    main()
