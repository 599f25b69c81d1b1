"""Time per loss call (forward + backward) for each objective against open_clip's ClipLoss.

    python benchmarks/objectives.py

Baseline: open_clip.loss.ClipLoss on the same inputs; goal: mmcl <= 1.1x ClipLoss.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from objectives.registry import REGISTRY, get_objective  # noqa: E402


def make_outputs(batch, dim):
    t = lambda: F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_(True)  # noqa: E731
    return {"image": t(), "text": t(), "image_aug": t(), "text_aug": t(),
            "logit_scale": torch.tensor(math.log(1 / 0.07), requires_grad=True),
            "logit_bias": torch.tensor(-10.0, requires_grad=True)}


def time_call(fn, o, min_seconds=0.5):
    fn(o)[0].backward() if isinstance(fn(o), tuple) else fn(o).backward()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 3:
        out = fn(o)
        (out[0] if isinstance(out, tuple) else out).backward()
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def main():
    torch.manual_seed(0)
    clip = ClipLoss()
    print(f"torch threads: {torch.get_num_threads()}; forward+backward per call, ms")
    header = f"{'B':>5} {'D':>4} {'ClipLoss':>9} " + " ".join(f"{n:>9}" for n in REGISTRY) + "  mmcl/ClipLoss"
    print(header)
    for batch in (256, 1024):
        for dim in (128, 512):
            o = make_outputs(batch, dim)
            base = time_call(lambda o: clip(o["image"], o["text"], o["logit_scale"].exp()), o)
            times = {n: time_call(get_objective(n), o) for n in REGISTRY}
            print(f"{batch:>5} {dim:>4} {base:>9.2f} " + " ".join(f"{t:>9.2f}" for t in times.values())
                  + f"  {times['mmcl'] / base:>6.2f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
