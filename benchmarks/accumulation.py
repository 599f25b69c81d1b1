"""Gradient accumulation (pretrain.accum_steps): time per optimiser step and peak memory for one
global batch split into 1 (the named baseline), 2 and 4 micro-batches, each setting in a fresh
process (peak resident memory is per process). The extra cost is one forward pass without
gradients per step (core.model.forward_backward); the gain is activation memory of a micro-batch.

    python benchmarks/accumulation.py [--model rn-tiny] [--batch 256] [--steps 3]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one_setting(model_name: str, batch: int, accum: int, steps: int) -> dict:
    import torch

    from core.model import DualEncoder, build_model, forward_backward, is_vit, make_optimizer, model_config
    from objectives.registry import get_objective

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, _, _ = build_model(model_name, "mmcl_ssl")
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    g, tokens = torch.Generator().manual_seed(0), model.context_length
    whole = {"image": torch.rand(batch, 3, size, size, generator=g),
             "text": torch.randint(1, 1000, (batch, tokens), generator=g),
             "image_aug": torch.rand(batch, 3, size, size, generator=g),
             "text_aug": torch.randint(1, 1000, (batch, tokens), generator=g)}
    micro = [{k: v[j * batch // accum:(j + 1) * batch // accum] for k, v in whole.items()} for j in range(accum)]
    wrapper, objective = DualEncoder(model), get_objective("mmcl_ssl")
    optimizer = make_optimizer(model, 1e-3, 0.1, vit=is_vit(model_config(model_name)))
    forward_backward(wrapper, objective, micro)  # warm-up
    optimizer.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        forward_backward(wrapper, objective, micro)
        optimizer.step()
        optimizer.zero_grad()
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rn-tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accum", type=int, help=argparse.SUPPRESS)  # one setting, in a child process
    args = parser.parse_args()
    if args.accum:
        print(json.dumps(one_setting(args.model, args.batch, args.accum, args.steps)))
        sys.exit()
    print(f"{args.model}, MMCL+SSL, global batch {args.batch}, 1 thread, {args.steps} steps per setting")
    results = {}
    for accum in (1, 2, 4):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                              "--steps", str(args.steps), "--accum", str(accum)], capture_output=True, text=True, check=True)
        results[accum] = json.loads(out.stdout.strip().splitlines()[-1])
        r, base = results[accum], results[1]
        print(f"accum_steps {accum}: {r['seconds_per_step']:6.2f} s/step ({r['seconds_per_step'] / base['seconds_per_step']:.2f}x "
              f"the baseline), {args.batch / r['seconds_per_step']:6.0f} samples/s, peak {r['peak_mib']:6.0f} MiB "
              f"({r['peak_mib'] / base['peak_mib']:.2f}x)")
