"""Curate throughput against a bare PIL loop, and peak memory at 10k vs 50k samples.

    python benchmarks/curate.py [--n 10000]

Figures: samples/s of (a) a bare loop that only reads, decodes, resizes and encodes the same
images with PIL, (b) curate's task functions in one process (per-core figure: the ratio b/a is
the stage's overhead), (c) the full Prefect flow with the default 2-process pool (wall clock,
start-up included); peak RSS of a curate run on 10k and 50k generated pairs (flat = streaming).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from core.data import corpus  # noqa: E402
from tasks import curate  # noqa: E402
from tasks.config import GeneratedSource, parse_params  # noqa: E402
from core.data.images import encode_image, resize  # noqa: E402


def make_csv_source(root: Path, n: int) -> Path:
    """n JPEG files at 64 px (so there is real decoding and resizing) and their CSV."""
    spec = GeneratedSource(kind="generated")
    (root / "img").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(n):
        s = corpus.render_sample(spec, 0, "train", i, 64)
        s.image.save(root / "img" / f"{i}.jpg", quality=90)
        lines.append(f'img/{i}.jpg,"{s.caption}"')
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def bare_loop(csv_path: Path, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        data = (csv_path.parent / "img" / f"{i}.jpg").read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            encode_image(resize(im.convert("RGB"), 32, "center_crop"), "png", 95)
    return n / (time.perf_counter() - t)


def params_for(root: Path, sources: list[dict], runner: str = "thread", workers: int = 1):
    return parse_params({"seed": 0, "curate": {
        "out_dir": str(root / "curated"), "staging_dir": str(root / "staging"),
        "runner": {"kind": runner, "workers": workers}, "sources": sources}})


def rss_child(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = params_for(Path(tmp), [{"kind": "generated", "name": "gen", "train_pairs": n, "eval_per_class": 0}])
        curate.run_sequential(params)
    print(json.dumps({"n": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rss", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss:
        return rss_child(args.rss)

    from flows.common import prefect_api
    from flows.curate import run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path = make_csv_source(root / "src", args.n)
        source = [{"kind": "csv", "name": "bench", "path": str(csv_path)}]
        bare = bare_loop(csv_path, args.n)
        curate.run_sequential(params_for(root / "warm", [dict(source[0], path=str(make_csv_source(root / "w", 50)))]))

        t = time.perf_counter()
        stats = curate.run_sequential(params_for(root / "fn", source))
        functions = args.n / (time.perf_counter() - t)
        assert stats["total"]["written"] == args.n, stats["total"]

        with prefect_api():
            t = time.perf_counter()
            run(params_for(root / "flow", source, runner="process", workers=2))
            flow_wall = args.n / (time.perf_counter() - t)

    rss = [json.loads(subprocess.check_output([sys.executable, __file__, "--rss", str(n)]).splitlines()[-1])
           for n in (10_000, 50_000)]

    print(f"images: {args.n} JPEG 64px -> PNG 32px, center_crop")
    print(f"bare PIL loop (1 process)              {bare:9.0f} samples/s")
    print(f"curate task functions (1 process)      {functions:9.0f} samples/s   ratio to bare {functions / bare:.2f} (goal >= 0.8)")
    print(f"curate Prefect flow (2-process pool)   {flow_wall:9.0f} samples/s   ratio to bare {flow_wall / bare:.2f} (wall, incl. start-up)")
    for r in rss:
        print(f"peak RSS curating {r['n']:>6} generated pairs: {r['peak_rss_mb']:.0f} MB")
    print(f"RSS ratio 50k/10k: {rss[1]['peak_rss_mb'] / rss[0]['peak_rss_mb']:.2f} (goal: flat, ~1.0)")


if __name__ == "__main__":
    main()
