"""The detect stage's work: score every training pair for being poisoned, under each poisoned model, with
each detector (detectors/), and measure the ranking against the poison stage's ground truth
(poison_manifest.parquet): AUROC with its interval, average precision, recall at the true poison count.

Outputs: `<out_dir>/<model>/scores.parquet` (key, poisoned, one column per detector) and the metrics,
`<metrics_dir>/detection.json`, {model: {detector: core.stats.detection_metrics}}.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.checkpoint import CheckpointError, load_model
from core.data.loader import SampleCache
from core.data.shards import atomic_write_json, check_shards, write_table
from core.errors import InputError
from core.frontier import is_control
from core.metrics import embed_pairs
from core.model import for_device
from core.stats import detection_metrics
from detectors.registry import get_detector
from tasks.config import DetectConfig, Params, require_section


class DetectError(InputError):
    """A detection that cannot run: names the parameter or file."""


def detect_config(params: Params) -> DetectConfig:
    return require_section(params, "detect", DetectError)


def models_of(params: Params) -> list[str]:
    """The poisoned models to inspect: `detect.models`, or every non-control model with a model.pt in models_dir."""
    cfg = detect_config(params)
    found = sorted(p.parent.name for p in cfg.models_dir.glob("*/model.pt") if not is_control(p.parent.name))
    names = cfg.models if cfg.models is not None else found
    missing = [m for m in names if m not in found]
    if missing or not names:
        raise DetectError(f"detect.models: no poisoned model {missing or ''} under {cfg.models_dir} (found: {found}); "
                          f"run pretrain first")
    return names


def detect_model(params: Params, model_name: str, truth: set[str]) -> dict:
    """One model's scores (scores.parquet, written atomically) and metrics per detector; seconds taken."""
    cfg = detect_config(params)
    try:
        model, preprocess, tokenizer = load_model(cfg.models_dir / model_name / "model.pt")
    except CheckpointError as err:
        raise DetectError(f"detect.models: {model_name!r}: {err}") from None
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu is not False else "cpu")
    started = time.time()
    emb = embed_pairs(for_device(model, device), preprocess, tokenizer, cfg.data_dir, device, cfg.batch_size,
                      loader_workers=cfg.loader_workers, cache=SampleCache(cfg.cache_mb))
    embed_seconds = time.time() - started
    poisoned = np.array([k in truth for k in emb["keys"]])
    absent = len(truth) - int(poisoned.sum())
    if absent:
        example = sorted(truth - set(emb["keys"]))[:3]
        raise DetectError(f"detect.manifest: {absent} of its {len(truth)} poisoned keys are not in detect.data_dir "
                          f"{cfg.data_dir} (e.g. {example}): the manifest and the shards come from different poison runs")
    image, text = emb["image"].numpy(), emb["text"].numpy()
    columns, metrics = {"key": emb["keys"], "poisoned": poisoned}, {}
    for name, detector in detectors(params).items():
        t = time.time()
        try:
            scores = detector.score(image, text)
            metrics[name] = detection_metrics(scores, poisoned) | {"seconds": round(time.time() - t, 2)}
        except ValueError as err:
            raise DetectError(f"detect.detectors: {name} on model {model_name!r} ({len(poisoned)} pairs in "
                              f"{cfg.data_dir}): {err}") from None
        columns[name] = scores
    out = cfg.out_dir / model_name
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "scores.parquet", pa.table(columns))
    return {"detectors": metrics, "embed_seconds": round(embed_seconds, 2), "pairs": len(emb["keys"])}


def detectors(params: Params) -> dict:
    """The detectors of `detect.detectors` with their options; DetectError naming the key for a bad value."""
    cfg = detect_config(params)
    try:
        return {name: get_detector(name, **cfg.detector_options.get(name, {})) for name in cfg.detectors}
    except ValueError as err:
        raise DetectError(f"detect.detector_options: {err}") from None


def ground_truth(params: Params) -> set[str]:
    """The keys of the poisoned training pairs (poison_manifest.parquet's `key` column), after checking the
    detectors' options and the training shards, so that bad input stops the stage before any model is embedded."""
    cfg = detect_config(params)
    detectors(params)
    check_shards(cfg.data_dir, "detect.data_dir")
    try:
        keys = pq.read_table(cfg.manifest, columns=["key"]).column("key").to_pylist()
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise DetectError(f"detect.manifest: {cfg.manifest}: {type(err).__name__}: {err} (the poison stage writes it)") from None
    if not keys:
        raise DetectError(f"detect.manifest: {cfg.manifest} lists no poisoned pair: nothing to detect")
    return set(keys)


def write_metrics(params: Params, result: dict) -> None:
    """detection.json (the DVC metrics): {model: detect_model's result}."""
    cfg = detect_config(params)
    cfg.metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.metrics_dir / "detection.json", result)
