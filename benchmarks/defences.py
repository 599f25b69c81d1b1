"""What the defences and detectors cost, each against its baseline in one run, on one core (as each of the two
concurrent pre-training runs gets on 2 cores): rn-tiny, 32 px, batch 64, generated corpus, batches in memory.

    python benchmarks/defences.py [--pairs 2048] [--steps 8] [--repeats 3]

- Pre-training step (forward, backward, fused AdamW) of MMCL: undefended; RoCLIP in a matching epoch (a full
  pool of 2,048 captions: one [64 x 2,048] similarity and the pool's update); SafeCLIP after its split (15% of
  the batch risky: the objective on the safe pairs, SSL on the risky ones, so the augmented views are encoded
  too). Baseline: the undefended MMCL step. (The loader's cost of SafeCLIP's views is not in it: see levers.py.)
- SafeCLIP's split, once an epoch: every pair embedded and a Gaussian mixture fitted; per 1,000 pairs, and as a
  share of an epoch of undefended MMCL steps.
- Cleaning step: PAR (MMCL plus the frozen model's forward) against CleanCLIP (MMCL+SSL).
- Detectors on 10,000 pairs of rn-tiny-sized (D = the model's embedding width) embeddings: seconds each.
Prints ms per step (median of `--repeats`, alternated: the machine is shared) and ratios.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.data.loader import BatchStream, SampleCache  # noqa: E402
from core.metrics import embed_pairs  # noqa: E402
from core.model import DualEncoder, build_model, forward_backward, make_optimizer  # noqa: E402
from defences.registry import get_defence, get_pretraining_defence  # noqa: E402
from defences.safeclip import split  # noqa: E402
from detectors.registry import REGISTRY as DETECTORS, get_detector  # noqa: E402
from levers import generated_corpus, step_arguments  # noqa: E402 (this folder's benchmark of the speed levers)
from objectives.registry import get_objective  # noqa: E402

BATCH = 64


def timed_steps(model, encoder, loss_fn, batch: dict, steps: int, before=lambda: None) -> float:
    """ms per optimiser step (after one warm-up step)."""
    optimizer = make_optimizer(model, 1e-3, 0.1, vit=False)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        before()
        forward_backward(encoder, loss_fn, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps * 1e3


def pretraining_step(defence: str, batch: dict, keys: list[str], steps: int) -> float:
    torch.manual_seed(0)
    model, _, _ = build_model("rn-tiny", "mmcl")
    model = model.to(memory_format=torch.channels_last)
    guard = get_pretraining_defence(defence)
    if defence == "roclip":
        guard.begin_epoch(1, None, 0)  # a matching epoch, its pool full
        guard.pool = torch.nn.functional.normalize(torch.randn(guard.size, model.text_projection.shape[1]), dim=-1)
    if defence == "safeclip":
        guard.risky, guard.mask = set(keys[: len(keys) * 15 // 100]), None
    loss_fn = guard.wrap(get_objective("mmcl"))
    return timed_steps(model, DualEncoder(model), loss_fn, batch, steps, before=lambda: guard.begin_step(keys))


def cleaning_step(defence_name: str, batch: dict, steps: int) -> float:
    torch.manual_seed(0)
    model, _, _ = build_model("rn-tiny", "mmcl")
    model = model.to(memory_format=torch.channels_last)
    defence = get_defence(defence_name)
    defence.prepare(model, None)
    return timed_steps(model, defence.encoder(model), defence.objective(), batch, steps)


def main():
    args = step_arguments()
    with tempfile.TemporaryDirectory() as tmp:
        folder = generated_corpus(Path(tmp), args.pairs)
        model, preprocess, tokenizer = build_model("rn-tiny", "mmcl")
        views = frozenset({"image_aug", "text_aug"})
        batch = next(iter(BatchStream(folder, BATCH, 0, 1, 0, preprocess, tokenizer, views).epoch(0)))
        keys = batch.pop("keys")
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
        print(f"rn-tiny, 32 px, batch {BATCH}, 1 thread, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"median of {args.repeats}")

        times = {d: [] for d in ("none", "roclip", "safeclip")}
        for _ in range(args.repeats):
            for d in times:
                plain = {k: v for k, v in batch.items() if d == "safeclip" or k in ("image", "text")}
                times[d].append(pretraining_step(d, plain, keys, args.steps))
        base = statistics.median(times["none"])
        for d, ts in times.items():
            print(f"pretrain MMCL step, {d:9s} {statistics.median(ts):7.1f} ms  {statistics.median(ts) / base:.2f}x the undefended")

        model = model.to(memory_format=torch.channels_last)
        splits = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pairs = embed_pairs(model, preprocess, tokenizer, folder, "cpu", 256, cache=SampleCache(1024))
            split(pairs["keys"], (pairs["image"] * pairs["text"]).sum(1).numpy(), None, 0.9, seed=0)
            splits.append(time.perf_counter() - start)
        per_k = statistics.median(splits) / args.pairs * 1e3
        epoch = base / 1e3 * (args.pairs // BATCH)
        print(f"safeclip split            {per_k * 1e3:7.1f} ms per 1,000 pairs  {statistics.median(splits) / epoch:.2f}x "
              f"an undefended epoch's steps ({args.pairs} pairs)")

        cleaning = {d: [] for d in ("cleanclip", "par")}
        for _ in range(args.repeats):
            for d in cleaning:
                cleaning[d].append(cleaning_step(d, batch if d == "cleanclip" else {k: batch[k] for k in ("image", "text")},
                                                 args.steps))
        ref = statistics.median(cleaning["cleanclip"])
        for d, ts in cleaning.items():
            print(f"clean step, {d:9s}        {statistics.median(ts):7.1f} ms  {statistics.median(ts) / ref:.2f}x CleanCLIP")

        rng = np.random.default_rng(0)
        dim = model.text_projection.shape[1]
        image = rng.normal(size=(10_000, dim)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text = image + 0.5 * rng.normal(size=image.shape).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        for name in DETECTORS:
            start = time.perf_counter()
            get_detector(name).score(image, text)
            print(f"detector {name:10s}       {time.perf_counter() - start:7.2f} s on 10,000 pairs (D = {dim})")


if __name__ == "__main__":
    main()
