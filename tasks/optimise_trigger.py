"""The optimise-trigger stage's work: a patch trigger optimised against a surrogate model
(core/optimised_trigger.py, after BadCLIP), for `poison.trigger.name: optimised`.

1. The surrogate (the flow trains it with the pretrain stage's trainer on `surrogate_params`): the attacker's
   model, pretrain's control of `optimise_trigger.surrogate` on the clean shards `optimise_trigger.data_dir`/train,
   with pretrain's recipe and seed `seed` (not `train_seed`: the poisoned data is the data seed's, shared by
   every training seed). It is a Ray Train run in `pretrain.storage_dir` like any other, so when pretrain's
   control is the same run (the defaults) that stage reuses it.
2. `optimise`: the patch from `images` non-target training images and the target's training images and
   captions, written to `<out_dir>.partial/patch.png` with trigger.json (settings, loss per step, the
   surrogate's zero-shot ASR on the held-out eval set before and after, seconds).
3. `publish` swaps the folder into place.

With another trigger the stage only records that it was not needed (trigger.json), in a second.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.captions import names_class, poison_captions
from core.checkpoint import load_model
from core.data.shards import (
    atomic_write_json, check_shards, decode_sample_image, iter_tar_samples, read_manifest, shard_sizes, swap_into_place,
)
from core.errors import InputError
from core.frontier import CONTROL_PREFIX
from core.metrics import classifier, load_classes
from core.model import encode_text
from core.optimised_trigger import PatchObjective, image_encoder, mean_loss, optimise_patch, paste, to_uint8
from core.seeds import sample_seed
from core.stats import binomial_interval
from core.triggers import patch_box
from tasks.config import OptimiseTriggerConfig, Params, require_section


class OptimiseTriggerError(InputError):
    """An optimisation that cannot run: names the parameter or file."""


def optimise_config(params: Params) -> OptimiseTriggerConfig:
    return require_section(params, "optimise_trigger", OptimiseTriggerError)


def needed(params: Params) -> bool:
    return params.poison is not None and params.poison.trigger.name == "optimised"


def partial_dir(params: Params) -> Path:
    return Path(f"{optimise_config(params).out_dir}.partial")


def reset_partial(params: Params) -> Path:
    shutil.rmtree(partial_dir(params), ignore_errors=True)
    partial_dir(params).mkdir(parents=True)
    return partial_dir(params)


def surrogate_params(params: Params) -> Params:
    """The params of the surrogate's run (the flow trains it with tasks.pretrain.train, control=True): pretrain's,
    with the data seed, `data_dir`/train as the control data and the export under `<out_dir>.partial/surrogate/`.
    OptimiseTriggerError when params have no pretrain section or the shards are damaged."""
    cfg = optimise_config(params)
    check_shards(cfg.data_dir / "train", "optimise_trigger.data_dir (train/)")
    recipe = require_section(params, "pretrain", OptimiseTriggerError).model_copy(update={
        "control_data_dir": cfg.data_dir / "train", "out_dir": partial_dir(params) / "surrogate"})
    return params.model_copy(update={"train_seed": params.seed, "pretrain": recipe})


def _images(data_dir: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """{key: [3, H, W] image in [0, 1]} of the samples `keys` in a shard folder."""
    out = {}
    for shard in shard_sizes(data_dir):
        for s in iter_tar_samples(data_dir / shard):
            if s["__key__"] in keys:
                out[s["__key__"]] = torch.from_numpy(np.asarray(decode_sample_image(s)).copy()).permute(2, 0, 1).float() / 255
    return out


def _pick(rng: np.random.Generator, indices: list[int], n: int) -> list[int]:
    return sorted(rng.choice(indices, size=min(n, len(indices)), replace=False).tolist()) if indices else []


@torch.no_grad()
def _target_text(model, tokenizer, captions: list[str]) -> torch.Tensor:
    """[D] the normalised mean of the captions' normalised embeddings."""
    embeddings = torch.cat([encode_text(model, tokenizer(captions[i:i + 256])) for i in range(0, len(captions), 256)])
    return torch.nn.functional.normalize(embeddings.mean(0), dim=0)


@torch.no_grad()
def surrogate_asr(params: Params, model, tokenizer, encoder, patches: dict[str, torch.Tensor]) -> dict:
    """{name: the surrogate's zero-shot ASR (%, 95% Wilson interval) with that patch [3, s, s]} on the held-out eval
    set `<data_dir>/eval/<poison.eval_set>`, each patch pasted where the poison stage pastes it on the ASR set
    (the images decoded once); {name: None} without that eval set."""
    eval_dir = optimise_config(params).data_dir / "eval" / params.poison.eval_set
    if not (eval_dir / "classes.json").is_file():
        return dict.fromkeys(patches)
    classes = load_classes(eval_dir)
    target = classes["classnames"].index(params.poison.target)
    weights = classifier(model, tokenizer, classes, "cpu")
    images, boxes = [], []
    for shard in shard_sizes(eval_dir):
        for s in iter_tar_samples(eval_dir / shard):
            if int(s["cls"]) == target:
                continue
            image = torch.from_numpy(np.asarray(decode_sample_image(s)).copy()).permute(2, 0, 1).float() / 255
            rng = np.random.default_rng(sample_seed(params.seed, s["__key__"], "eval"))  # tasks.poison.trigger_sample's
            images.append(image)
            boxes.append(patch_box(params.poison.trigger, image.shape[1], image.shape[2], rng))
    batches = [(torch.stack(images[i:i + 256]), boxes[i:i + 256]) for i in range(0, len(images), 256)]
    out = {}
    for name, patch in patches.items():
        predicted = torch.cat([(encoder(paste(batch, patch, where)) @ weights).argmax(1) for batch, where in batches])
        hits = int((predicted == target).sum())
        low, high = binomial_interval(hits / len(images), len(images))
        out[name] = {"asr": 100 * hits / len(images), "ci95": [100 * low, 100 * high], "n": len(images)}
    return out


def optimise(params: Params, surrogate: dict) -> dict:
    """The patch against the exported surrogate: patch.png and trigger.json in `<out_dir>.partial`; the summary."""
    cfg, poison = optimise_config(params), params.poison
    started = time.time()
    surrogate_dir = partial_dir(params) / "surrogate" / f"{CONTROL_PREFIX}{cfg.surrogate}"
    model, preprocess, tokenizer = load_model(surrogate_dir / "model.pt")
    encoder = image_encoder(model, preprocess)
    train_dir = cfg.data_dir / "train"
    table = read_manifest(train_dir)
    keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
    naming = [names_class(c, poison.target) for c in captions]
    if not any(naming):
        raise OptimiseTriggerError(f"optimise_trigger.data_dir: no caption in {train_dir} names the target "
                                   f"{poison.target!r} (poison.target): the patch has no target images to move toward")
    rng = np.random.default_rng((params.seed, 0x0971))
    ground = _pick(rng, [i for i, t in enumerate(naming) if not t], cfg.images)
    positives = _pick(rng, [i for i, t in enumerate(naming) if t], cfg.images)
    decoded = _images(train_dir, {keys[i] for i in ground + positives})
    images = torch.stack([decoded[keys[i]] for i in ground])
    with torch.no_grad():
        own = torch.cat([encoder(images[i:i + 256]) for i in range(0, len(images), 256)])
        targets = torch.cat([encoder(torch.stack([decoded[keys[i]] for i in positives[j:j + 256]]))
                             for j in range(0, len(positives), 256)])
    text = _target_text(model, tokenizer, poison_captions(poison.captions, poison.target, captions))
    objective = PatchObjective(text, targets, own, cfg.margin, cfg.image_weight)
    seed = sample_seed(params.seed, "patch", "optimise-trigger")
    first, _ = optimise_patch(encoder, images, objective, poison.trigger, 0, cfg.batch_size, cfg.lr, seed)  # the start
    prepared = time.time()
    patch, losses = optimise_patch(encoder, images, objective, poison.trigger, cfg.steps, cfg.batch_size, cfg.lr, seed)
    seconds = time.time() - prepared
    pixels = to_uint8(patch)
    Image.fromarray(pixels).save(partial_dir(params) / "patch.png")
    stored = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255  # what the poison stage will paste
    window = max(1, len(losses) // 10)
    on_all = {name: mean_loss(encoder, images, objective, poison.trigger, p, seed + 1) for name, p in
              (("initial", first), ("optimised", stored))}
    summary = {
        "trigger": "optimised", "optimised": True, "target": poison.target, "side_px": int(patch.shape[-1]),
        "placement": poison.trigger.placement, "settings": cfg.identity(), "seed": params.seed,
        "surrogate": {k: surrogate[k] for k in ("objective", "run_id", "steps", "epochs", "final_loss", "wall_seconds")},
        "images": len(ground), "target_images": len(positives),
        "loss": {"initial_on_all": on_all["initial"], "optimised_on_all": on_all["optimised"],  # the same draw
                 "first": losses[0], "last": losses[-1], f"first_{window}_mean": float(np.mean(losses[:window])),
                 f"last_{window}_mean": float(np.mean(losses[-window:])), "per_step": losses},
        "surrogate_asr": surrogate_asr(params, model, tokenizer, encoder, {"initial": first, "optimised": stored}),
        "seconds": {"optimise": round(seconds, 1), "prepare": round(prepared - started, 1),
                    "surrogate": surrogate["wall_seconds"]},
        "steps_per_s": round(cfg.steps / seconds, 2),
    }
    atomic_write_json(partial_dir(params) / "trigger.json", summary)
    return summary


def not_needed(params: Params) -> dict:
    """trigger.json saying the stage had nothing to do (another trigger), in `<out_dir>.partial`."""
    name = params.poison.trigger.name if params.poison else None
    summary = {"trigger": name, "optimised": False,
               "note": f"poison.trigger.name is {name!r}: only `optimised` uses this stage's patch"}
    atomic_write_json(partial_dir(params) / "trigger.json", summary)
    return summary


def publish(params: Params) -> Path:
    return swap_into_place(partial_dir(params), optimise_config(params).out_dir)


def read_summary(out: Path) -> dict:
    return json.loads((out / "trigger.json").read_text())
