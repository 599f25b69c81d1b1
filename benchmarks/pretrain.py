"""Pre-training throughput: our Ray Train stage (1 and 2 workers) against a bare PyTorch loop and
open_clip's own trainer, on the same model and global batch, plus achieved GFLOP/s against GEMM.

    python benchmarks/pretrain.py [--steps 48] [--batch 128]

Baselines: open_clip_train.main (CPU, fp32, synthetic data) and a bare single-process loop over
pre-decoded tensors. Goals: ours >= 1.0x open_clip's trainer; 2 workers <= 1.3x the time of one process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from core.model import MODELS_DIR, DualEncoder, build_model, make_optimizer  # noqa: E402
from tasks import curate, pretrain  # noqa: E402
from tasks.config import parse_params  # noqa: E402
from core.data.loader import BatchStream  # noqa: E402

MODEL = "rn-tiny"


def gemm_gflops(n=2048, reps=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def step_flops(model, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        img = model.encode_image(batch["image"], normalize=True)
        txt = model.encode_text(batch["text"], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        labels = torch.arange(len(img))
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
    model.zero_grad()
    return counter.get_total_flops()


def bare_loop(params, steps: int) -> tuple[float, float]:
    """Same model, optimiser, loss and batches, decoded up front: the compute-only rate."""
    cfg = params.pretrain
    torch.manual_seed(0)
    model, preprocess, tokenizer = build_model(MODEL, "mmcl")
    stream = BatchStream(cfg.data_dir, cfg.batch_size, 0, 1, 0, preprocess, tokenizer)
    batches = list(stream.epoch(0))[:steps]
    flops = step_flops(model, batches[0])
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, vit=False)
    from objectives.registry import get_objective

    objective = get_objective("mmcl")
    wrapper = DualEncoder(model)
    t = time.perf_counter()
    for batch in batches:
        loss, _ = objective(wrapper({k: v for k, v in batch.items() if k != "keys"}))
        loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t
    return len(batches) * cfg.batch_size / seconds, flops


def ours(params, workers: int) -> tuple[float, float]:
    """(steady-state samples/s from the training log, wall seconds including Ray start-up)."""
    p = params.model_copy(update={"pretrain": params.pretrain.model_copy(update={
        "num_workers": workers, "threads_per_worker": max(1, (os.cpu_count() or 2) // workers),
        "storage_dir": f"{params.pretrain.storage_dir}-{workers}"})})
    t = time.perf_counter()
    metrics = pretrain.train(p, "mmcl")
    wall = time.perf_counter() - t
    log = [json.loads(l) for l in (Path(p.pretrain.out_dir) / "mmcl" / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in log if "samples_per_s" in r][1:]  # skip the first (warm-up) window
    assert metrics["steps"] == len(log)
    return sum(rates) / len(rates), wall


def open_clip_trainer(tmp: Path, batch: int, steps: int) -> float:
    """open_clip_train.main on the CPU, fp32, synthetic data, same model config: samples/s from its log."""
    folder = tmp / "oc_model"
    folder.mkdir()
    cfg = json.loads((MODELS_DIR / f"{MODEL}.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic", "--train-num-samples",
           str(batch * steps), "--batch-size", str(batch), "--epochs", "1", "--device", "cpu", "--precision", "fp32",
           "--workers", "1", "--warmup", "2", "--lr", "1e-3", "--model", f"local-dir:{folder}", "--logs", str(tmp / "oc_logs"),
           "--log-every-n-steps", "4", "--save-frequency", "0", "--report-to", "", "--name", "bench"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp)
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", out.stdout + out.stderr)]
    if not rates:
        raise RuntimeError(f"open_clip_train printed no rate:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = args.steps * args.batch
        params = parse_params({"seed": 0, "curate": {
            "out_dir": str(tmp / "curated"), "staging_dir": str(tmp / "staging"), "runner": {"kind": "thread"},
            "sources": [{"kind": "generated", "name": "gen", "train_pairs": n, "eval_per_class": 1}]},
            "pretrain": {"data_dir": str(tmp / "curated" / "train"), "out_dir": str(tmp / "models"),
                         "storage_dir": str(tmp / "ray"), "model": MODEL, "epochs": 1, "batch_size": args.batch,
                         "log_every": 4, "checkpoint_every": 1000}})
        curate.run_sequential(params)
        torch.set_num_threads(os.cpu_count() or 2)
        gemm = gemm_gflops()
        bare, flops = bare_loop(params, args.steps)
        one, one_wall = ours(params, 1)
        two, two_wall = ours(params, 2)
        reference = open_clip_trainer(tmp, args.batch, args.steps)
    per_sample = flops / args.batch / 1e9
    print(f"model {MODEL}, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores; "
          f"{per_sample * args.batch:.1f} GFLOP per step (forward + backward)")
    print(f"GEMM fp32 2048^3:                  {gemm:7.1f} GFLOP/s")
    print(f"bare PyTorch loop (1 process):     {bare:7.0f} samples/s  {bare * per_sample:6.1f} GFLOP/s "
          f"({bare * per_sample / gemm:.0%} of GEMM)")
    print(f"open_clip_train.main (synthetic):  {reference:7.0f} samples/s")
    print(f"ours, Ray Train 1 worker:          {one:7.0f} samples/s  {one * per_sample:6.1f} GFLOP/s; "
          f"ratio to open_clip {one / reference:.2f} (goal >= 1.0); to bare {one / bare:.2f}; wall {one_wall:.0f}s")
    print(f"ours, Ray Train 2 workers:         {two:7.0f} samples/s; time ratio to 1 process "
          f"{one / two:.2f} (goal <= 1.3); wall {two_wall:.0f}s")


if __name__ == "__main__":
    main()
