"""The shard check that runs before training (core.data.shards.check_shards) against reading the same
shards once with webdataset, the loader's own reader (the named baseline).

    python benchmarks/shard_check.py [--samples 20000]

Figures, in one run on the same tars (a generated img2dataset-style folder of 64 px JPEGs, 1000
samples a shard): samples/s and MB/s of the first check (every member read, every tar hashed), of a
second check in the same process (stat signature unchanged: nothing read), and of webdataset 1.0.2's
`tarfile_to_samples` over the folder; the ratio says what the check costs against one pass of the data.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from core.data.shards import ShardSink, atomic_write_json, check_shards  # noqa: E402


def make_shards(folder: Path, n: int) -> int:
    """n samples (a 64 px JPEG of about 2 KB, a caption, a JSON) in shards of 1000; returns bytes written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    jpeg = []
    for i in range(64):  # a pool of distinct images, reused: encoding is not what is measured
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=50)
        jpeg.append(buf.getvalue())
    with ShardSink(folder / "shard", 1000) as sink:
        for i in range(n):
            key = f"{i:09d}"
            sink.write({"__key__": key, "jpg": jpeg[i % 64], "txt": f"a photo number {i}".encode(), "json": b"{}"},
                       {"key": key, "caption": f"a photo number {i}", "sha256": "0" * 64, "width": 64, "height": 64,
                        "source": "bench", "split": "train", "cls": None})
        shards = sink.close()
    atomic_write_json(folder / "sizes.json", {s["tar"]: s["n"] for s in shards})
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        size = make_shards(folder, args.samples)
        urls = [str(p) for p in sorted(folder.glob("*.tar"))]
        baseline = timed(lambda: sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())))
        first = timed(lambda: check_shards(folder, "bench"))
        again = timed(lambda: check_shards(folder, "bench"))
    n, mb = args.samples, size / 1e6
    print(f"{n} samples, {mb:.1f} MB in {len(urls)} tars")
    print(f"webdataset read (baseline):   {n / baseline:9.0f} samples/s  {mb / baseline:7.1f} MB/s")
    print(f"check_shards, first:          {n / first:9.0f} samples/s  {mb / first:7.1f} MB/s  "
          f"({first / baseline:.2f}x the baseline's time)")
    print(f"check_shards, unchanged:      {n / again:9.0f} samples/s  ({again * 1e3:.1f} ms, "
          f"{first / again:.0f}x faster than the first)")
    print(f"at CC3M scale (3.3M samples) the first check would take about {3.3e6 / (n / first) / 60:.1f} min on one core")


if __name__ == "__main__":
    main()
