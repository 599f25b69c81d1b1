"""Poison-stage throughput against curate on the same data, and per-trigger cost per image.

    python benchmarks/poison.py [--n 10000]

Baseline: the curate stage's task functions on the same generated corpus (one process each).
Goal: poison samples/s >= 0.8x curate samples/s.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from tasks import curate, poison  # noqa: E402
from tasks.config import TriggerConfig, parse_params  # noqa: E402
from core.triggers import apply_trigger  # noqa: E402


def params_for(root: Path, n: int, count: int):
    return parse_params({"seed": 0, "curate": {
        "out_dir": str(root / "curated"), "staging_dir": str(root / "staging"), "runner": {"kind": "thread", "workers": 1},
        "sources": [{"kind": "generated", "name": "gen", "train_pairs": n, "eval_per_class": 50}]},
        "poison": {"in_dir": str(root / "curated"), "out_dir": str(root / "poisoned"), "count": count,
                   "trigger": {"patch_size": 0.25}, "cleaning": {"size": min(2000, n // 2)}}})


def trigger_costs(side: int, repeats: int = 300) -> dict[str, float]:
    img = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    costs = {}
    for name in ("noise_patch", "fixed_patch", "yellow", "blended", "sig", "wanet"):
        cfg = TriggerConfig(name=name)
        apply_trigger(img, cfg, 0, 0)  # warm caches (fixed patterns, warp grid)
        t = time.perf_counter()
        for i in range(repeats):
            apply_trigger(img, cfg, i, 0)
        costs[name] = (time.perf_counter() - t) / repeats * 1e6
    return costs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--count", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warm = params_for(Path(tmp) / "warm", 200, 10)  # one-off imports out of the timings
        curate.run_sequential(warm)
        poison.run_sequential(warm)
        params = params_for(Path(tmp) / "run", args.n, args.count)
        t = time.perf_counter()
        curate.run_sequential(params)
        curate_rate = args.n / (time.perf_counter() - t)
        t = time.perf_counter()
        stats = poison.run_sequential(params)
        poison_rate = args.n / (time.perf_counter() - t)
    print(f"data: {args.n} generated pairs at 32 px, {stats['poisons']} poisons (noise_patch 8 px), "
          f"ASR set {stats['eval_asr']}, cleaning subset {stats['cleaning']}; validation included")
    print(f"curate (baseline)  {curate_rate:8.0f} samples/s")
    print(f"poison             {poison_rate:8.0f} samples/s   ratio {poison_rate / curate_rate:.2f} (goal >= 0.8)")
    for side in (32, 224):
        costs = trigger_costs(side)
        print(f"trigger cost per image at {side} px (us): " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
