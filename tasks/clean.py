"""The clean stage's work: fine-tune a pre-trained (poisoned) model on the cleaning subset with a
defence, for each learning rate of a sweep, evaluating accuracy, ASR and the clean target rate after
every epoch (epoch 0 is the model before cleaning).

`clean_run` is one (model, defence, lr) run: plain PyTorch in one process, idempotent (a finished run
is read back), run in parallel by the flow. `assemble_sweep` gathers a cell's runs into sweep.json
(the evaluate stage's input) and keeps the checkpoint of the best frontier point.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from core.checkpoint import CheckpointError, exported_sha256, load_model
from core.data.loader import BatchStream, SampleCache
from core.data.shards import atomic_write_json, check_shards, digest, file_sha256, replacing, shard_sizes
from core.errors import InputError
from core.metrics import EvalError, attack_target, check_eval_sets, evaluate, flat, load_classes, target_index
from core.model import (
    NUMERICS, RunStopped, build_model, for_device, forward_backward, is_vit, make_optimizer, non_finite,
    optimizer_step, schedule, to_device,
)
from defences import OPTIONS
from defences.registry import get_defence
from tasks.config import CleanConfig, Params, require_section


class CleanError(InputError):
    """A sweep that cannot start; names the parameter or file. Raised before training."""


def clean_config(params: Params) -> CleanConfig:
    return require_section(params, "clean", CleanError)


def target_of(params: Params) -> str:
    return attack_target(clean_config(params).eval_dir)


def checkpoint_of(params: Params, model: str) -> Path:
    return clean_config(params).models_dir / model / "model.pt"


def cell_dir(params: Params, model: str, defence: str) -> Path:
    return clean_config(params).out_dir / model / defence


def run_dir(params: Params, model: str, defence: str, lr: float) -> Path:
    return cell_dir(params, model, defence) / f"lr-{lr:.3g}"


def check_sweep(params: Params, model: str, defence: str) -> None:
    """Clear errors before any training: checkpoint, cleaning data, defence."""
    cfg = clean_config(params)
    try:
        get_defence(defence, **cfg.defence_options.get(defence, {}))
    except ValueError as err:  # a value out of its range (names and options are checked with params)
        raise CleanError(f"clean.defence_options.{defence}: {err}") from None
    try:
        load_model(checkpoint_of(params, model))
    except CheckpointError as err:
        raise CleanError(f"clean.models: {model!r}: {err}") from None
    check_shards(cfg.data_dir, "clean.data_dir")
    n = sum(shard_sizes(cfg.data_dir).values())
    if n < cfg.batch_size:
        raise CleanError(f"clean.data_dir: the cleaning subset has {n} pairs, fewer than clean.batch_size={cfg.batch_size}")
    check_eval_sets(cfg.eval_dir, "clean.eval_dir")
    try:
        target_index(load_classes(cfg.eval_dir / "labelled"), target_of(params), str(cfg.eval_dir / "labelled"))
    except EvalError as err:
        raise CleanError(f"clean.eval_dir: {err}") from None


def _measure(params: Params, model, preprocess, tokenizer, device, cache: SampleCache) -> dict:
    cfg = clean_config(params)
    metrics = evaluate(model, preprocess, tokenizer, cfg.eval_dir / "labelled", cfg.eval_dir / "asr", target_of(params),
                       device, cfg.eval_batch_size, retrieval=False, loader_workers=cfg.loader_workers, cache=cache)
    return flat(metrics)


def _freeze_bn_stats(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _better(a: dict, b: dict | None) -> bool:
    """The best frontier point: the most accurate with ASR <= 5%, else the lowest ASR; a model whose
    predictions collapsed onto one class (core/metrics.py) only when no other point exists."""
    if b is None:
        return True
    key = lambda p: (not p.get("collapsed"), p["asr"] <= 0.05, p["accuracy"] if p["asr"] <= 0.05 else -p["asr"])  # noqa: E731
    return key(a) > key(b)


def run_identity(params: Params, model: str, defence: str, lr: float) -> str:
    """What one sweep run computes: the seed, the clean settings that change results
    (`CleanConfig.identity`), the model's checkpoint bytes, the defence and its options, the learning
    rate, and the digests of the cleaning data and eval sets (with their target). Not: the runner,
    threads, evaluation batch size, or the other learning rates of the sweep."""
    cfg = clean_config(params)
    return digest({"seed": params.training_seed, "clean": cfg.identity(), "numerics": NUMERICS, "model": model,
                   "defence": defence, "lr": lr,
                   "checkpoint": exported_sha256(checkpoint_of(params, model)),
                   "options": OPTIONS[defence] | cfg.defence_options.get(defence, {}),
                   "data": check_shards(cfg.data_dir, "clean.data_dir"),
                   "eval": check_eval_sets(cfg.eval_dir, "clean.eval_dir")}, 12)


def clean_run(params: Params, model_name: str, defence_name: str, lr: float) -> dict:
    """One sweep run; returns {"lr", "points": [per-epoch metrics], "best": point, "run_id"} (also
    epochs.json). A finished run is reused only if its run_id (`run_identity`) is this one's: after a
    change of settings, data or model its folder is cleared and the run trains again."""
    cfg = clean_config(params)
    out = run_dir(params, model_name, defence_name, lr)
    done = out / "epochs.json"
    run_id = run_identity(params, model_name, defence_name, lr)
    if done.is_file():
        finished = json.loads(done.read_text())
        if finished.get("run_id") == run_id:
            return finished
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads_per_run or max(1, (os.cpu_count() or 1) // cfg.runner.workers))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defence = get_defence(defence_name, **cfg.defence_options.get(defence_name, {}))
    objective = defence.objective()
    model, preprocess, tokenizer = load_model(checkpoint_of(params, model_name))
    meta = json.loads((checkpoint_of(params, model_name).parent / "model_config.json").read_text())
    model = for_device(model, device)
    cache = SampleCache(cfg.cache_mb)  # the eval sets and the cleaning data, read and decoded once
    points = [{"epoch": 0, "lr": lr, **_measure(params, model, preprocess, tokenizer, device, cache)}]
    torch.manual_seed(params.training_seed)
    fresh, _, _ = build_model(meta["model"], meta["objective"])
    defence.prepare(model, for_device(fresh, device))
    stream = BatchStream(cfg.data_dir, cfg.batch_size, 0, 1, params.training_seed, preprocess, tokenizer, objective.views,
                         loader_workers=cfg.loader_workers, pin_memory=device.type == "cuda", cache=cache)
    total = cfg.epochs * stream.steps_per_epoch
    optimizer = make_optimizer(model, lr, cfg.weight_decay, is_vit(meta["open_clip_config"]))
    scheduler = schedule(optimizer, cfg.warmup_steps, total)
    wrapper = defence.encoder(model)
    best, started, diverged = None, time.time(), None
    for epoch in range(cfg.epochs):
        model.train()
        if cfg.freeze_bn_stats:
            _freeze_bn_stats(model)
        losses, epoch_start = [], time.time()
        for batch in stream.epoch(epoch):
            loss, _ = forward_backward(wrapper, objective, [to_device(batch, device)])
            if not torch.isfinite(loss):
                diverged = f"the loss became {loss.item()} at step {scheduler.last_epoch + 1} (epoch {epoch + 1})"
                break
            optimizer_step(model, optimizer, scheduler)
            losses.append(loss.item())
        bad = None if diverged else non_finite(model)
        if bad:
            diverged = f"{len(bad)} tensor(s) of the model became non-finite by the end of epoch {epoch + 1}"
        if diverged:  # not a result: the run's points are kept for inspection but never chosen
            print(f"clean: {model_name}/{defence_name} lr {lr:g} diverged: {diverged}; this run is left out", flush=True)
            break
        train_seconds, eval_start = time.time() - epoch_start, time.time()
        point = {"epoch": epoch + 1, "lr": lr, "loss": sum(losses) / len(losses),
                 **_measure(params, model, preprocess, tokenizer, device, cache)}
        point |= {"train_seconds": round(train_seconds, 2), "eval_seconds": round(time.time() - eval_start, 2)}
        points.append(point)
        if _better(point, best):
            best = point
            with replacing(out / "best.pt") as tmp:
                torch.save(model.state_dict(), tmp)
    result = {"model": model_name, "defence": defence_name, "lr": lr, "run_id": run_id, "points": points, "best": best,
              "seconds": round(time.time() - started, 1)} | ({"diverged": diverged} if diverged else {})
    atomic_write_json(done, result)
    return result


def _holds_best_of(cell: Path, run_id: str) -> bool:
    """Whether the cell already holds the best checkpoint of run `run_id` (an earlier assembly copied
    it there and dropped the run's own copy)."""
    sweep = cell / "sweep.json"
    return (cell / "best.pt").is_file() and sweep.is_file() and json.loads(sweep.read_text()).get("best_run") == run_id


def assemble_sweep(params: Params, model: str, defence: str, runs: list[dict]) -> dict:
    """sweep.json for the cell: the pretrained point, every per-epoch point of the runs that did not
    diverge (diverged runs are listed apart), and the best point's checkpoint copied to best.pt with
    its model_config.json and sha256 (per-run checkpoints are dropped). RunStopped if every run diverged."""
    cell = cell_dir(params, model, defence)
    runs = sorted(runs, key=lambda r: r["lr"])
    kept = [r for r in runs if "diverged" not in r]
    if not kept:
        why = "; ".join(f"lr {r['lr']:g}: {r['diverged']}" for r in runs)
        raise RunStopped(f"clean: every run of {model}/{defence} diverged ({why}); lower clean.lrs")
    points = [p for r in kept for p in r["points"] if p["epoch"] > 0]
    best_run = None
    for r in kept:
        if _better(r["best"], best_run["best"] if best_run else None):
            best_run = r
    source = run_dir(params, model, defence, best_run["lr"]) / "best.pt"
    if source.is_file():
        shutil.copyfile(source, cell / "best.pt")
    elif not _holds_best_of(cell, best_run["run_id"]):
        raise CleanError(f"{source}: dropped when this sweep was assembled before with another best run; delete "
                         f"{source.parent / 'epochs.json'} to train lr {best_run['lr']:g} again")
    meta = json.loads((checkpoint_of(params, model).parent / "model_config.json").read_text())
    atomic_write_json(cell / "model_config.json", meta | {"sha256": {"best.pt": file_sha256(cell / "best.pt")}})
    for r in runs:
        (run_dir(params, model, defence, r["lr"]) / "best.pt").unlink(missing_ok=True)
    sweep = {"model": model, "defence": defence, "pretrained": runs[0]["points"][0], "points": points,
             "best": best_run["best"], "best_run": best_run["run_id"], "lrs": [r["lr"] for r in runs],
             "epochs": clean_config(params).epochs,
             "diverged": [{"lr": r["lr"], "why": r["diverged"]} for r in runs if "diverged" in r],
             "seconds": sum(r["seconds"] for r in runs)}
    atomic_write_json(cell / "sweep.json", sweep)
    return sweep
