"""Reading users' files: the tar reader against webdataset's own, and the CSV decoder against Python's.

    python benchmarks/ingest.py [--samples 5000] [--rows 500000]

Figures, in one run on the same files:
- tar: samples/s and samples recovered by `core.data.shards.iter_tar_samples` and by webdataset 1.0.2's
  reader (`tar_file_expander` + `group_by_keys`, the named baseline) on (a) an img2dataset-style tar
  (a sample's members adjacent) and (b) the same files tarred by `tar -C dir -cf x.tar .` (members in
  directory order, `./` prefixed), where the baseline splits samples apart;
- CSV: rows/s of curate's CSV scan (`_check_csv`: incremental decoding that names the line of a bad
  byte) against `csv.reader` over `open(encoding="utf-8-sig")`, which names no line.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tasks.config import CsvSource  # noqa: E402
from core.data.shards import iter_tar_samples  # noqa: E402
from core.data.sources import _check_csv  # noqa: E402


def make_files(folder: Path, n: int) -> None:
    """n samples of a 64 px JPEG (about 2 KB), a caption and a JSON."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=50)
        (folder / f"{i:09d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:09d}.txt").write_text(f"caption of sample {i}")
        (folder / f"{i:09d}.json").write_text("{}")


def adjacent_tar(folder: Path, path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f.name)


def timed(read, path: Path) -> tuple[float, int, int]:
    """(samples/s, samples, samples holding both an image and a caption)."""
    t = time.perf_counter()
    samples = list(read(path))
    dt = time.perf_counter() - t
    return len(samples) / dt, len(samples), sum(1 for s in samples if "jpg" in s and "txt" in s)


def webdataset_reader(path: Path):
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    return group_by_keys(tar_file_expander(url_opener([{"url": str(path)}])))


def csv_rows(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        f.write("image,caption\n")
        for i in range(rows):
            f.write(f"img/{i:09d}.jpg,\"a caption with a comma, and café {i}\"\n")


def python_csv(path: Path) -> int:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        next(rows)
        return sum(1 for _ in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5_000)
    ap.add_argument("--rows", type=int, default=500_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root / "files", args.samples)
        adjacent_tar(root / "files", root / "adjacent.tar")
        subprocess.run(["tar", "-C", str(root / "files"), "-cf", str(root / "dir-order.tar"), "."], check=True)

        print(f"tar of {args.samples} samples (64 px JPEG + txt + json)        samples/s  samples  complete")
        for layout in ("adjacent", "dir-order"):
            path = root / f"{layout}.tar"
            ours, base = timed(iter_tar_samples, path), timed(webdataset_reader, path)
            print(f"  {layout:9} ours (iter_tar_samples)                {ours[0]:9.0f} {ours[1]:8d} {ours[2]:9d}")
            print(f"  {layout:9} webdataset 1.0.2 (baseline)            {base[0]:9.0f} {base[1]:8d} {base[2]:9d}"
                  f"   speed ratio ours/baseline {ours[0] / base[0]:.2f}")

        path = root / "pairs.csv"
        csv_rows(path, args.rows)
        t = time.perf_counter()
        n = _check_csv(CsvSource(kind="csv", name="bench", path=path))
        ours = n / (time.perf_counter() - t)
        t = time.perf_counter()
        assert python_csv(path) == n
        base = n / (time.perf_counter() - t)
        print(f"CSV scan of {n} rows: ours {ours:,.0f} rows/s, csv.reader over open() {base:,.0f} rows/s, "
              f"ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
