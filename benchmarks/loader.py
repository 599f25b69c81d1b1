"""Training-batch throughput at 224 px: our loader (core.data.loader.BatchStream) against webdataset's
own pipeline in a torch DataLoader, on the same JPEG shards, preprocess and number of loader processes.

    python benchmarks/loader.py [--samples 768] [--processes 1 2] [--batch 64] [--repeats 3] [--ray-data]

Shards: generated JPEGs of 256-400 px (64 distinct, cycled) (as img2dataset writes CC3M at --image_size 256 and above), RN50's
open_clip preprocess (resize 224, center crop, normalise), its tokenizer. "+ SSL views" adds what
MMCL+SSL needs: an AutoAugment view of each image and an EDA view of each caption. The baseline splits
shards over its processes (webdataset's split_by_worker) and so gives batches that change with the
process count; ours gives the same bytes for any count. `--ray-data` adds Ray Data's streaming
read_webdataset + map_batches (the alternative for feeding GPU nodes from CPU nodes). Goals: ours >= 1.0x the baseline at every count;
>= 1.7x from 1 to 2 processes on an idle 2-core machine.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from core.data.loader import BatchStream  # noqa: E402
from core.data.shards import ShardSink, atomic_write_json  # noqa: E402
from core.data.views import TextViews, image_view  # noqa: E402
from core.seeds import sample_seed  # noqa: E402

VIEWS = frozenset({"image_aug", "text_aug"})


def photo(rng: np.random.Generator) -> bytes:
    """A JPEG of 256-400 px with smooth structure and noise (pure noise would decode unrealistically slowly)."""
    w, h = rng.integers(256, 401, 2)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / rng.uniform(5, 40) + c) * np.cos(y / rng.uniform(5, 40)) for c in range(3)], -1)
    pixels = np.clip(127 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, n: int, per_shard: int) -> None:
    """n captioned samples; the images cycle through 64 distinct JPEGs (decoding costs the same, and
    thousands of samples are written in seconds)."""
    rng = np.random.default_rng(0)
    photos = [photo(rng) for _ in range(min(n, 64))]
    folder.mkdir(parents=True)
    with ShardSink(folder / "shard", per_shard) as sink:
        for i in range(n):
            key = f"{i:06d}"
            caption = f"a photo of a small red object number {i} on a wooden table"
            sink.write({"__key__": key, "jpg": photos[i % len(photos)], "txt": caption.encode()},
                       {"key": key, "caption": caption, "sha256": "0" * 64, "width": 0, "height": 0, "source": "bench",
                        "split": "train", "cls": None})
        shards = sink.close()
    atomic_write_json(folder / "sizes.json", {s["tar"]: s["n"] for s in shards})


class BaselineViews:
    """The SSL views in webdataset's pipeline, as our loader makes them (same cost, other plumbing)."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer, self.text_views = preprocess, tokenizer, TextViews(0)

    def __call__(self, sample: dict) -> dict:
        image, caption, key = sample["jpg"], sample["txt"], sample["__key__"]
        return {"image": self.preprocess(image), "text": self.tokenizer([caption])[0],
                "image_aug": image_view(image, sample_seed(0, key, "image_aug"), self.preprocess),
                "text_aug": self.tokenizer([self.text_views(key, caption)])[0]}


def baseline(folder: Path, preprocess, tokenizer, batch: int, processes: int, views: bool):
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                             empty_check=False).shuffle(1000).decode("pil")
    if views:
        dataset = dataset.map(BaselineViews(preprocess, tokenizer)).batched(batch, partial=False)
    else:
        dataset = dataset.to_tuple("jpg", "txt").map_tuple(preprocess, lambda t: tokenizer([t])[0]).batched(batch, partial=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=processes)


class RayDecode:
    """Ray Data's map_batches step: preprocess a block of rows (read_webdataset's read tasks decoded the
    JPEGs to arrays), tokenize the captions."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, rows: dict) -> dict:
        images = [self.preprocess(Image.fromarray(a)) for a in rows["jpg"]]
        return {"image": torch.stack(images).numpy(), "text": self.tokenizer(list(rows["txt"])).numpy()}


def ray_data(folder: Path, preprocess, tokenizer, batch: int, processes: int):
    """Ray Data streaming read_webdataset -> map_batches in `processes` decoding actors -> torch batches,
    as a Ray Train worker would consume it from CPU nodes (order: whatever block is ready first)."""
    import ray

    ds = ray.data.read_webdataset(sorted(str(p) for p in folder.glob("*.tar")), decoder=False)
    ds = ds.map_batches(RayDecode, fn_constructor_args=(preprocess, tokenizer), batch_size=batch, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=processes))
    return ({"image": b["image"]} for b in ds.iter_torch_batches(batch_size=batch, drop_last=True))


def rate(batches) -> float:
    start, seen = time.perf_counter(), 0
    for b in batches:
        seen += len(b["image"] if isinstance(b, dict) else b[0])
    return seen / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=768)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray-data", action="store_true", help="also Ray Data's streaming read_webdataset")
    args = ap.parse_args()
    import open_clip

    preprocess = open_clip.image_transform(224, is_train=False)
    tokenizer = open_clip.get_tokenizer("RN50")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_shards(folder, args.samples, args.samples // 8)  # 8 shards
        print(f"{args.samples} JPEGs 256-400 px in 8 shards, RN50 preprocess to 224 px, batch {args.batch}, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        for views in (False, True):
            ours_at = {}
            for p in args.processes:
                stream = BatchStream(folder, args.batch, 0, 1, 0, preprocess, tokenizer, VIEWS if views else frozenset(),
                                     loader_workers=p)
                # alternated, median of the repeats: the machine is shared and noisy
                pairs = [(rate(stream.epoch(0)), rate(baseline(folder, preprocess, tokenizer, args.batch, p, views)))
                         for _ in range(args.repeats)]
                ours = ours_at[p] = statistics.median(o for o, _ in pairs)
                base = statistics.median(b for _, b in pairs)
                print(f"{'+ SSL views' if views else 'image+text':11s} {p:2d} loader processes: ours {ours:6.0f} samples/s, "
                      f"webdataset+DataLoader {base:6.0f} samples/s, ratio {ours / base:.2f} (goal >= 1.0)")
                if args.ray_data and not views:
                    import ray

                    ray.init(num_cpus=p + 1, include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")
                    ray.data.DataContext.get_current().enable_progress_bars = False
                    rate(ray_data(folder, preprocess, tokenizer, args.batch, p))  # warm: actors and workers started
                    print(f"{'':11s}    Ray Data read_webdataset + map_batches({p} actors): "
                          f"{rate(ray_data(folder, preprocess, tokenizer, args.batch, p)):6.0f} samples/s")
                    ray.shutdown()
            if len(ours_at) > 1:
                lo, hi = min(ours_at), max(ours_at)
                print(f"{'':11s} ours from {lo} to {hi} processes: {ours_at[hi] / ours_at[lo]:.2f}x")


if __name__ == "__main__":
    main()
