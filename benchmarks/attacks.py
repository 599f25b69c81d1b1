"""What the attacks cost, each against its baseline in one run, on one core: rn-tiny, 32 px, batch 64, generated corpus.

    python benchmarks/attacks.py [--pairs 2048] [--steps 8] [--repeats 3]

- A patch-optimisation step (core/optimised_trigger.py: the surrogate's forward and backward to the patch's
  pixels, Adam on the patch) against a pre-training step of MMCL on the same batch size (forward, backward and
  fused AdamW on the model), the baseline: the optimise-trigger stage's `steps` in units of pre-training steps.
- The poison stage (tasks.poison.build and its GX suites, in this process) under `noise_patch` (the baseline),
  `optimised` (a stored patch) and `caption` (apple -> banana: no image is decoded or encoded) on the corpus,
  the same number of poisons.
Prints ms per step and seconds per poison run (medians of `--repeats`, alternated: the machine is shared) and ratios.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.data.loader import BatchStream  # noqa: E402
from core.data.validation import raise_on_failure  # noqa: E402
from core.model import build_model  # noqa: E402
from core.optimised_trigger import PatchObjective, image_encoder, optimise_patch  # noqa: E402
from levers import generated_corpus, step_arguments, step_ms  # noqa: E402 (this folder's benchmark of the speed levers)
from tasks import poison  # noqa: E402
from tasks.config import TriggerConfig, parse_params  # noqa: E402

BATCH = 64
TRIGGERS = {"noise_patch": {"name": "noise_patch"}, "optimised": {"name": "optimised"},
            "caption": {"name": "caption", "source_class": "apple"}}


def patch_step_ms(images: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model, preprocess, _ = build_model("rn-tiny", "mmcl")
    encoder = image_encoder(model, preprocess)
    with torch.no_grad():
        own = encoder(images)
    objective = PatchObjective(own[0], own[:BATCH], own)
    optimise_patch(encoder, images, objective, TriggerConfig(), 1, BATCH, 0.01, 0)  # warm-up
    start = time.perf_counter()
    optimise_patch(encoder, images, objective, TriggerConfig(), steps, BATCH, 0.01, 0)
    return (time.perf_counter() - start) / steps * 1e3


def poison_seconds(curated: Path, out: Path, trigger: dict, poisons: int) -> float:
    params = parse_params({"seed": 0, "curate": {"out_dir": str(curated), "sources": [{"kind": "generated"}]},
                           "poison": {"in_dir": str(curated), "out_dir": str(out), "trigger_dir": str(out.parent / "trigger"),
                                      "count": poisons, "trigger": trigger, "cleaning": {"size": 200},
                                      "runner": {"kind": "thread"}}})
    start = time.perf_counter()
    raise_on_failure(poison.validate_poisoned(params, poison.build(params)))
    seconds = time.perf_counter() - start
    shutil.rmtree(poison.partial_dir(params))
    return seconds


def main():
    args = step_arguments()
    with tempfile.TemporaryDirectory() as tmp:
        folder = generated_corpus(Path(tmp), args.pairs)
        _, preprocess, tokenizer = build_model("rn-tiny", "mmcl")
        batch = next(iter(BatchStream(folder, BATCH, 0, 1, 0, preprocess, tokenizer, frozenset()).epoch(0)))
        images = torch.rand(args.pairs, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        print(f"rn-tiny, 32 px, batch {BATCH}, 1 thread, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"median of {args.repeats}")
        times = {"pretrain": [], "patch": []}
        for _ in range(args.repeats):
            times["pretrain"].append(step_ms("mmcl", batch, True, True, args.steps))
            times["patch"].append(patch_step_ms(images, args.steps))
        base = statistics.median(times["pretrain"])
        for name, ts in times.items():
            print(f"{name + ' step':14s} {statistics.median(ts):7.1f} ms  {statistics.median(ts) / base:.2f}x a pre-training MMCL step")

        patch = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        (Path(tmp) / "trigger").mkdir()
        Image.fromarray(patch).save(Path(tmp) / "trigger" / "patch.png")
        poisons = max(1, args.pairs // 20)  # the apples' captions bound the caption attack: ~1/11 of the pairs
        seconds = {name: [] for name in TRIGGERS}
        for _ in range(args.repeats):
            for name, trigger in TRIGGERS.items():
                seconds[name].append(poison_seconds(folder.parent, Path(tmp) / "poisoned", trigger, poisons))
        ref = statistics.median(seconds["noise_patch"])
        for name, ts in seconds.items():
            print(f"poison {name:11s} {statistics.median(ts):6.2f} s  {statistics.median(ts) / ref:.2f}x noise_patch "
                  f"({poisons} poisons of {args.pairs} pairs, with the GX suites)")


if __name__ == "__main__":
    main()
