"""Cleaning sweep: wall time with runs in parallel against the same runs one after another, and
evaluation cost per epoch as a share of the epoch.

    python benchmarks/clean.py [--lrs 3e-4 1e-3 3e-3 --epochs 2]

Uses the pipeline's data and models (run `make run` first): data/poisoned and data/models/pretrain/mmcl.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.clean import clean_flow  # noqa: E402
from flows.common import make_task_runner, prefect_api  # noqa: E402
from tasks.config import load_params  # noqa: E402


def sweep(params, runner: dict, out: Path) -> tuple[float, dict]:
    p = params.model_copy(update={"clean": params.clean.model_copy(update={
        "out_dir": out, "runner": params.clean.runner.model_copy(update=runner), "threads_per_run": None})})
    t = time.perf_counter()
    (result,) = clean_flow.with_options(task_runner=make_task_runner(p.clean.runner))(p, [("mmcl", "cleanclip")])
    return time.perf_counter() - t, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    params = load_params("params.yaml")
    params = params.model_copy(update={"clean": params.clean.model_copy(update={"lrs": args.lrs, "epochs": args.epochs})})
    with tempfile.TemporaryDirectory() as tmp, prefect_api():
        serial, _ = sweep(params, {"kind": "thread", "workers": 1}, Path(tmp) / "serial")
        parallel, result = sweep(params, {"kind": "process", "workers": 2}, Path(tmp) / "parallel")
        shutil.rmtree(tmp, ignore_errors=True)
    points = result["points"]
    train = sum(p["train_seconds"] for p in points)
    evals = sum(p["eval_seconds"] for p in points)
    print(f"sweep: mmcl x cleanclip, {len(args.lrs)} learning rates x {args.epochs} epochs")
    print(f"runs one after another (1 thread-pool worker): {serial:6.1f} s")
    print(f"runs in parallel (2-process pool):              {parallel:6.1f} s   ratio {parallel / serial:.2f}")
    print(f"evaluation per epoch: {evals / len(points):.2f} s of {(train + evals) / len(points):.2f} s "
          f"({evals / (train + evals):.0%} of the epoch)")


if __name__ == "__main__":
    main()
