"""Evaluation throughput at 224 px: our metrics path (core.metrics.predict: JPEG shards decoded in N loader
processes while the image encoder runs) against a bare loop that only runs the image encoder on one
batch of pre-decoded tensors already on the device (both fp32, as the evaluate stage); and peak memory
of the trainer process for N vs 5N images (its loader processes hold a bounded number of batches).

    python benchmarks/evaluate.py [--images 256] [--processes 0 2] [--model RN50]
    python benchmarks/evaluate.py --dry-run            # tiny: checks the script runs

Goals: ours >= 0.9x the bare loop; peak memory flat in the eval set's size (<= 1.2x for 5x the images).
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.data.shards import ShardSink, atomic_write_json  # noqa: E402
from core.metrics import predict  # noqa: E402
from core.model import build_model, for_device  # noqa: E402


def write_eval_set(folder: Path, n: int, side: int = 224, classes: int = 10) -> None:
    """n labelled JPEGs at the model's side, as curate writes an eval set; the images cycle through 64
    distinct photo-like ones (smooth structure + noise: decoding costs the same, writing takes seconds)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    photos = []
    for _ in range(min(n, 64)):
        base = np.stack([np.sin(x / rng.uniform(5, 40) + c) * np.cos(y / rng.uniform(5, 40)) for c in range(3)], -1)
        buf = io.BytesIO()
        Image.fromarray(np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    folder.mkdir(parents=True)
    with ShardSink(folder / "shard", 1000) as sink:
        for i in range(n):
            key, cls = f"{i:07d}", i % classes
            sink.write({"__key__": key, "jpg": photos[i % len(photos)], "txt": f"a photo of class {cls}".encode(),
                        "cls": str(cls).encode()},
                       {"key": key, "caption": f"a photo of class {cls}", "sha256": "0" * 64, "width": side,
                        "height": side, "source": "bench", "split": "eval", "cls": cls})
        shards = sink.close()
    atomic_write_json(folder / "sizes.json", {s["tar"]: s["n"] for s in shards})


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(folder: Path, model_name: str, batch: int, processes: int, device: torch.device, bare_loop: bool) -> dict:
    torch.manual_seed(0)
    model, preprocess, _ = build_model(model_name, "mmcl")
    model = for_device(model, device).eval()
    weights = torch.nn.functional.normalize(torch.randn(model.visual.output_dim, 10, device=device), dim=0)
    n = sum(json.loads((folder / "sizes.json").read_text()).values())
    images = next(iter_batches(folder, preprocess, batch)).to(device).contiguous(memory_format=torch.channels_last)
    bare = None
    with torch.no_grad():  # fp32, as the evaluate stage runs
        model.encode_image(images[:8])  # warm-up
        if bare_loop:
            sync(device)
            start = time.perf_counter()
            for _ in range(0, n, batch):
                model.encode_image(images, normalize=True)
            sync(device)
            bare = (n // batch + (n % batch > 0)) * batch / (time.perf_counter() - start)
        start = time.perf_counter()
        pred = predict(model, weights, folder, preprocess, device, batch, loader_workers=processes)
        sync(device)
        ours = len(pred["keys"]) / (time.perf_counter() - start)
    return {"n": n, "bare": bare, "ours": ours, "peak_rss_gib": peak_rss_gib()}


def iter_batches(folder: Path, preprocess, batch: int):
    from core.metrics import _batches

    return (b["image"] for b in _batches(folder, preprocess, batch))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--processes", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "PROCESSES", "BARE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:
        args.images, args.batch, args.processes = 32, 16, [0, 2]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.child:  # one measurement in a fresh process, so that its peak memory is its own
        print(json.dumps(measure(Path(args.child[0]), args.model, args.batch, int(args.child[1]), device,
                                 args.child[2] == "bare")))
        return
    print(f"{args.model} at 224 px, batch {args.batch}, device {device}, images {args.images} and {5 * args.images}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.images, 5 * args.images):
            write_eval_set(Path(tmp) / str(n), n)
        for p in args.processes:
            runs = []
            for n in (args.images, 5 * args.images):
                bare = "bare" if n == args.images else "-"  # the larger set is for the memory only
                out = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / str(n)), str(p), bare,
                                      "--batch", str(args.batch), "--model", args.model], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            small, large = runs
            print(f"{p:2d} loader processes: bare image-encoder loop {small['bare']:7.1f} images/s, ours {small['ours']:7.1f} "
                  f"images/s, ratio {small['ours'] / small['bare']:.2f} (goal >= 0.9); peak RSS {small['peak_rss_gib']:.2f} GiB "
                  f"for {small['n']} images, {large['peak_rss_gib']:.2f} GiB for {large['n']}: "
                  f"{large['peak_rss_gib'] / small['peak_rss_gib']:.2f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
