"""Evaluation throughput: our metrics (streamed from shards, zero-shot + ASR bookkeeping) against a bare
loop that only runs the image encoder on the same images, pre-decoded in memory.

    python benchmarks/evaluate.py

Uses the pipeline's eval sets and model (run `make run` first). Goal: ratio >= 0.9.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.checkpoint import load_model  # noqa: E402
from core.metrics import _batches, classifier, load_classes, predict  # noqa: E402
from core.data.shards import decode_sample_image  # noqa: E402

EVAL = Path("data/poisoned/eval/labelled")
MODEL = Path("data/models/pretrain/mmcl/model.pt")


def main(repeats: int = 3):
    model, preprocess, tokenizer = load_model(MODEL)
    model.eval()
    weights = classifier(model, tokenizer, load_classes(EVAL), "cpu")
    images = torch.cat([torch.stack([preprocess(decode_sample_image(s)) for s in chunk]) for chunk in _batches(EVAL, preprocess, 256)])
    n = len(images)
    with torch.no_grad():
        model.encode_image(images[:256])  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            for i in range(0, n, 256):
                model.encode_image(images[i:i + 256], normalize=True)
        bare = n * repeats / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        predict(model, weights, EVAL, preprocess, "cpu", 256)
    ours = n * repeats / (time.perf_counter() - t)
    print(f"{n} eval images, model {MODEL.parent.name}, {torch.get_num_threads()} threads")
    print(f"bare image-encoder loop (pre-decoded): {bare:7.0f} images/s")
    print(f"ours (shards -> decode -> predict):    {ours:7.0f} images/s   ratio {ours / bare:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
