"""Cost of validating params.yaml in a fresh process, against the named baseline of what it cost
before the registries became plain data: the same validation plus importing torch and open_clip
(the objectives' and defences' modules that the validators imported).

    python benchmarks/params.py [--repeats 3]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VALIDATE = "from tasks.config import load_params; load_params('params.yaml')"
BASELINE = "import torch, open_clip; " + VALIDATE


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bare = statistics.median(seconds("pass") for _ in range(args.repeats))
    ours = statistics.median(seconds(VALIDATE) for _ in range(args.repeats))
    base = statistics.median(seconds(BASELINE) for _ in range(args.repeats))
    print(f"fresh interpreter:                      {bare:6.2f} s")
    print(f"validate params.yaml (ours):            {ours:6.2f} s  ({ours - bare:.2f} s over the interpreter)")
    print(f"baseline (+ import torch, open_clip):   {base:6.2f} s  ({base - bare:.2f} s over the interpreter)")
    print(f"ratio baseline/ours, over the interpreter: {(base - bare) / max(ours - bare, 1e-9):.1f}x")
