"""The evaluate stage's work: load models, compute metrics, gather cleaning sweeps, write DVC
metrics and plots and the report (tasks/report.py)."""
from __future__ import annotations

import csv
import json
import os
import re
import zipfile
from pathlib import Path

import torch

from tasks.config import EvaluateConfig, Params, attack_target, require_section
from tasks.frontier import baseline_of, frontier
from tasks.metrics import EvalError, check_eval_sets, evaluate
from tasks.shards import atomic_write_json, file_sha256


def evaluate_config(params: Params) -> EvaluateConfig:
    return require_section(params, "evaluate", EvalError)


def target_of(params: Params) -> str:
    return attack_target(params, "evaluate", EvalError)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile, in either order
_EXPORT_HINT = "export a state_dict: torch.save(model.state_dict(), 'model.pt')"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist())


def _unreadable(path: Path, err: Exception) -> str:
    """One line saying what a file that torch.load(weights_only=True) refused is."""
    pickled = _UNSUPPORTED_GLOBAL.search(str(err))
    if pickled:
        return (f"{path} holds a pickled {pickled.group(1)} object, not a state_dict; objects are never unpickled "
                f"from files (that runs code); {_EXPORT_HINT}")
    if path.stat().st_size == 0:
        return f"{path} is not a readable torch checkpoint: the file is empty"
    # torch's own advice (load with weights_only=False) would run the file's code: show only what failed
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    cause = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else "")
    return (f"{path} is not a readable torch checkpoint (truncated, damaged or not a checkpoint): "
            f"{type(err).__name__} {cause[:200]}").rstrip()


def read_state_dict(path: Path) -> dict:
    """Parameter tensors of a checkpoint file: a plain state_dict (ours, torch.save'd, or
    `.safetensors`), an open_clip_train checkpoint (`state_dict`) or one of our training
    checkpoints (`model`); DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed.
    Raises EvalError in one line naming the file and what it holds instead (TorchScript, a pickled
    model object, a damaged file)."""
    if not path.is_file():
        raise EvalError(f"checkpoint {'is not a file' if path.exists() else 'not found'}: {path}")
    if _is_torchscript(path):
        raise EvalError(f"{path} is a TorchScript archive (torch.jit.save), not a state_dict; load it with "
                        f"torch.jit.load and {_EXPORT_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch and safetensors raise many types for files they cannot read
        raise EvalError(_unreadable(path, err)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # an open_clip_train checkpoint
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # one of our checkpoints
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(state)[:8]}"
        raise EvalError(f"{path} holds a {kind}, not a state_dict of tensors; {_EXPORT_HINT}")
    return {_unwrapped(k): v for k, v in state.items()}


def _fitted(state: dict, expected: set[str]) -> dict:
    """`state` without the prefix its keys share when the model's keys lack it (a training
    framework's attribute name, e.g. Lightning's `model.`); unchanged when no prefix fits."""
    head = os.path.commonprefix(list(state)).rpartition(".")[0]
    while head and not expected & set(state):
        stripped = {k[len(head) + 1:]: v for k, v in state.items()}
        if expected & set(stripped):
            return stripped
        head = head.rpartition(".")[0]
    return state


def _unwrapped(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_model(checkpoint: Path, model_name: str | None = None, objective: str = "mmcl"):
    """(model, preprocess, tokenizer) from a state_dict file; the model name comes from the
    model_config.json beside it (our exports) or from `model_name`. Raises EvalError naming the file
    when it is not the one model_config.json's sha256 recorded (damaged or replaced after export),
    holds NaN or inf (a diverged run), or does not fit the model."""
    from tasks.pretrain import build_model

    config = checkpoint.parent / "model_config.json"
    meta = json.loads(config.read_text()) if config.is_file() else {}
    state = read_state_dict(checkpoint)
    expected = meta.get("sha256", {}).get(checkpoint.name)
    if expected and file_sha256(checkpoint) != expected:
        raise EvalError(f"{checkpoint} is not the file that was exported: its sha256 differs from the one in {config} "
                        f"(damaged or replaced); run the stage that wrote it again")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise EvalError(f"{checkpoint} holds NaN or inf in {len(bad)} of {len(state)} tensors (e.g. {bad[:3]}): "
                        f"the run that wrote it diverged")
    if model_name is None:
        if not meta:
            raise EvalError(f"{checkpoint}: no model_config.json beside it; give the open_clip model name")
        model_name, objective = meta["model"], meta.get("objective", objective)
    model, preprocess, tokenizer = build_model(model_name, objective)
    state = _fitted(state, set(model.state_dict()))
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as err:  # shape mismatches
        raise EvalError(f"{checkpoint} does not match model {model_name!r}: {str(err)[:600]}") from None
    if missing or unexpected:
        raise EvalError(f"{checkpoint} does not match model {model_name!r}: missing keys {missing[:5]}, "
                        f"unexpected keys {unexpected[:5]}")
    return model, preprocess, tokenizer


def device_for(cfg: EvaluateConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu is not False else "cpu")


def evaluate_checkpoint(params: Params, checkpoint: Path, model_name: str | None = None) -> dict:
    cfg = evaluate_config(params)
    model, preprocess, tokenizer = load_model(checkpoint, model_name)  # the file the user named is checked first
    check_eval_sets(cfg.eval_dir, "evaluate.eval_dir")
    device = device_for(cfg)
    return evaluate(model.to(device), preprocess, tokenizer, cfg.eval_dir / "clean", cfg.eval_dir / "asr",
                    target_of(params), device, cfg.batch_size)


def flat(metrics: dict) -> dict:
    """The headline numbers of `tasks.metrics.evaluate`'s output."""
    zs = metrics["zero_shot"]
    out = {"accuracy": zs["top1"], "top5": zs["top5"], "chance": zs["chance"], "top_class_share": zs["top_class_share"],
           "collapsed": zs["collapsed"]}
    if "attack" in metrics:
        out |= {k: metrics["attack"][k] for k in ("asr", "asr_top5", "clean_target_rate", "asr_excess")}
    return out | metrics.get("retrieval", {})


def pretrained_models(params: Params) -> dict[str, Path]:
    cfg = evaluate_config(params)
    return {p.parent.name: p for p in sorted(cfg.models_dir.glob("*/model.pt"))}


def load_sweeps(params: Params) -> dict[str, dict]:
    """Every cleaning sweep's per-epoch points, keyed "<pretrained>/<defence>"."""
    cfg = evaluate_config(params)
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(cfg.sweeps_dir.glob("*/*/sweep.json"))}


def cells(pretrained: dict[str, dict], sweeps: dict[str, dict]) -> dict[str, dict]:
    """The study's table: for each (pretrained model, defence) the frontier of its sweep, the
    poisoned model's numbers, and the unpoisoned baseline of the same objective when trained."""
    out = {}
    for name, sweep in sweeps.items():
        model = name.split("/")[0]
        poisoned = sweep.get("pretrained") or pretrained.get(model)
        if poisoned is None:
            continue
        baseline = baseline_of(pretrained, model)
        out[name] = frontier(sweep["points"], poisoned) | {
            "pretrained": model, "defence": sweep["defence"], "baseline_accuracy": baseline["accuracy"] if baseline else None,
            "diverged": [d["lr"] for d in sweep.get("diverged", [])]}
    return out


def write_plots(params: Params, sweeps: dict[str, dict]) -> None:
    """CSV files for `dvc plots`: accuracy vs ASR of every swept point, and pre-training loss curves."""
    cfg = evaluate_config(params)
    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.plots_dir / "frontier.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "lr", "epoch", "accuracy", "asr", "clean_target_rate"])
        for name, sweep in sweeps.items():
            for p in sweep["points"]:
                w.writerow([name, p["lr"], p["epoch"], p["accuracy"], p["asr"], p["clean_target_rate"]])
    with open(cfg.plots_dir / "train_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "loss"])
        for log in sorted(cfg.models_dir.glob("*/train_log.jsonl")):
            for line in log.read_text().splitlines():
                r = json.loads(line)
                w.writerow([log.parent.name, r["step"], r["loss"]])


def run_evaluation(params: Params) -> dict:
    """Evaluate every pre-trained model, gather the sweeps, write metrics, plots and the report."""
    from tasks.report import write_report

    cfg = evaluate_config(params)
    models = pretrained_models(params)
    if not models:
        raise EvalError(f"evaluate.models_dir: no */model.pt under {cfg.models_dir} (run pretrain first)")
    pretrained = {name: flat(evaluate_checkpoint(params, path)) for name, path in models.items()}
    sweeps = load_sweeps(params)
    table = cells(pretrained, sweeps)
    cfg.metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.metrics_dir / "pretrain.json", pretrained)
    atomic_write_json(cfg.metrics_dir / "frontier.json", table)
    write_plots(params, sweeps)
    report = write_report(params, pretrained, sweeps, table)
    return {"pretrained": pretrained, "cells": table, "report": str(report)}
