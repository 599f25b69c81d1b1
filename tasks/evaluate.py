"""The evaluate stage's work: load models, compute metrics, gather cleaning sweeps, write DVC
metrics and plots and the report (tasks/report.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from core.checkpoint import load_model
from core.data.shards import atomic_write_json
from core.frontier import control_of, frontier
from core.metrics import EvalError, attack_target, check_eval_sets, evaluate, flat, read_attack
from core.model import for_device
from tasks.config import EvaluateConfig, Params, require_section


def evaluate_config(params: Params) -> EvaluateConfig:
    return require_section(params, "evaluate", EvalError)


def target_of(params: Params) -> str:
    return attack_target(evaluate_config(params).eval_dir)


def device_for(cfg: EvaluateConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu is not False else "cpu")


def evaluate_checkpoint(params: Params, checkpoint: Path, model_name: str | None = None) -> dict:
    cfg = evaluate_config(params)
    model, preprocess, tokenizer = load_model(checkpoint, model_name)  # the file the user named is checked first
    check_eval_sets(cfg.eval_dir, "evaluate.eval_dir")
    device = device_for(cfg)
    return evaluate(for_device(model, device), preprocess, tokenizer, cfg.eval_dir / "labelled", cfg.eval_dir / "asr",
                    target_of(params), device, cfg.batch_size, loader_workers=cfg.loader_workers)


def pretrained_models(params: Params) -> dict[str, Path]:
    cfg = evaluate_config(params)
    return {p.parent.name: p for p in sorted(cfg.models_dir.glob("*/model.pt"))}


def load_sweeps(params: Params) -> dict[str, dict]:
    """Every cleaning sweep's per-epoch points, keyed "<pretrained>/<defence>"."""
    cfg = evaluate_config(params)
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(cfg.cleaned_dir.glob("*/*/sweep.json"))}


def cells(pretrained: dict[str, dict], sweeps: dict[str, dict]) -> dict[str, dict]:
    """The study's table: for each (pretrained model, defence) the frontier of its sweep, the
    poisoned model's numbers, and the unpoisoned control of the same objective when trained."""
    out = {}
    for name, sweep in sweeps.items():
        model = name.split("/")[0]
        poisoned = sweep.get("pretrained") or pretrained.get(model)
        if poisoned is None:
            continue
        control = control_of(pretrained, model)
        out[name] = frontier(sweep["points"], poisoned) | {
            "pretrained": model, "defence": sweep["defence"], "control_accuracy": control["accuracy"] if control else None,
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
    detection = json.loads(cfg.detection.read_text()) if cfg.detection.is_file() else None
    report = write_report(params, read_attack(evaluate_config(params).eval_dir), pretrained, sweeps, table, detection)
    return {"pretrained": pretrained, "cells": table, "report": str(report)}
