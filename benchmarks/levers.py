"""The default study's speed levers, each off and on in one run, on one core (as each of the two
concurrent pre-training runs gets on 2 cores): rn-tiny, 32 px, batch 64, generated corpus.

    python benchmarks/levers.py [--pairs 2048] [--steps 8] [--repeats 3]

Step (forward, backward, fused AdamW; batches in memory) per objective:
- baseline: open_clip's `encode_text` over the whole 32-token context, default memory layout;
- + trimmed text: `core.model.encode_text` (up to the batch's last end-of-text token);
- + channels_last: images and weights in the layout oneDNN's convolutions prefer.
(MMCL+SSL's caption and its EDA view go through the text tower in one pass in every setting.)
Loader (one epoch, a thread as in training, after a first epoch): no cache against `SampleCache`.
Prints ms per batch and the ratios; median of `--repeats`, alternated (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core import model as core_model  # noqa: E402
from core.data.loader import BatchStream, SampleCache  # noqa: E402
from core.model import DualEncoder, build_model, forward_backward, make_optimizer  # noqa: E402
from objectives.registry import get_objective  # noqa: E402
from tasks import curate  # noqa: E402
from tasks.config import parse_params  # noqa: E402

BATCH = 64


def step_ms(objective_name: str, batch: dict, trimmed: bool, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model, _, _ = build_model("rn-tiny", objective_name)
    batch = {k: v for k, v in batch.items() if k != "keys"}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
    objective, wrapper = get_objective(objective_name), DualEncoder(model)
    optimizer = make_optimizer(model, 1e-3, 0.1, vit=False)
    full = lambda m, text: m.encode_text(text, normalize=True)  # noqa: E731 (open_clip's, the whole context)
    with mock.patch.object(core_model, "encode_text", core_model.encode_text if trimmed else full):
        for i in range(steps + 1):  # the first is a warm-up
            if i == 1:
                start = time.perf_counter()
            forward_backward(wrapper, objective, [batch])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps * 1e3


def loader_ms(folder: Path, preprocess, tokenizer, views: frozenset, cache_mb: float) -> float:
    stream = BatchStream(folder, BATCH, 0, 1, 0, preprocess, tokenizer, views, cache=SampleCache(cache_mb))
    for _ in stream.epoch(0):  # fills the cache
        pass
    start = time.perf_counter()
    n = sum(1 for _ in stream.epoch(1))
    return (time.perf_counter() - start) / n * 1e3


def step_arguments() -> argparse.Namespace:
    """--pairs (the corpus), --steps (timed per measurement), --repeats (medians of): the step benchmarks' options;
    and torch on one thread, as each of the two concurrent pre-training runs gets on 2 cores."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    torch.set_num_threads(1)
    return ap.parse_args()


def generated_corpus(tmp: Path, pairs: int) -> Path:
    """The generated corpus' `pairs` training pairs curated under `tmp`; returns the shard folder."""
    params = parse_params({"seed": 0, "curate": {
        "out_dir": str(tmp / "curated"), "staging_dir": str(tmp / "staging"), "runner": {"kind": "thread"},
        "sources": [{"kind": "generated", "name": "gen", "train_pairs": pairs, "eval_per_class": 1}]}})
    curate.run_sequential(params)
    return tmp / "curated" / "train"


def main():
    args = step_arguments()
    with tempfile.TemporaryDirectory() as tmp:
        folder = generated_corpus(Path(tmp), args.pairs)
        _, preprocess, tokenizer = build_model("rn-tiny", "mmcl")
        print(f"rn-tiny, 32 px, batch {BATCH}, 1 thread, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"median of {args.repeats}")
        for name in ("mmcl", "mmcl_ssl"):
            views = get_objective(name).views
            batch = next(iter(BatchStream(folder, BATCH, 0, 1, 0, preprocess, tokenizer, views).epoch(0)))
            settings = {"baseline": (False, False), "+ trimmed text": (True, False), "+ channels_last": (True, True)}
            times = {k: [] for k in settings}
            for _ in range(args.repeats):
                for label, (trimmed, layout) in settings.items():
                    times[label].append(step_ms(name, batch, trimmed, layout, args.steps))
            base = statistics.median(times["baseline"])
            for label, ts in times.items():
                print(f"{name:8s} step {label:16s} {statistics.median(ts):6.1f} ms  {base / statistics.median(ts):.2f}x")
            loads = {mb: statistics.median(loader_ms(folder, preprocess, tokenizer, views, mb) for _ in range(args.repeats))
                     for mb in (0, 1024)}
            print(f"{name:8s} loader no cache        {loads[0]:6.1f} ms  1.00x")
            print(f"{name:8s} loader SampleCache     {loads[1024]:6.1f} ms  {loads[0] / loads[1024]:.2f}x")


if __name__ == "__main__":
    main()
