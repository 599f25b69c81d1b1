"""Evaluation metrics as plain functions: zero-shot accuracy, attack success rate beside the clean
target rate, and retrieval recall. Shared by the clean and evaluate stages.

- Zero-shot: each class embedding is the normalised mean of the normalised embeddings of every
  prompt template for the class (open_clip's `build_zero_shot_classifier`); top-1, top-5, per class.
- ASR: on the triggered images whose true class is not the target, the share predicted as the target
  (top-1; also top-5). The clean target rate is the same share on the same images without the
  trigger: a model that over-predicts the target shows it there too, so we report both and the excess.
- Retrieval: image->text and text->image recall@1/5/10 on held-out captioned pairs.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from core.errors import InputError
from core.data.loader import SampleCache, parallel
from core.data.shards import check_shards, digest, shard_sizes
from core.model import encode_text


class EvalError(InputError):
    """An eval set that cannot be evaluated on; names the file or parameter."""


def load_classes(eval_dir: Path) -> dict:
    path = eval_dir / "classes.json"
    if not path.is_file():
        raise EvalError(f"{eval_dir}: no classes.json (class names and prompt templates)")
    meta = json.loads(path.read_text())
    if not meta.get("classnames"):
        raise EvalError(f"{path}: no class names")
    return meta


def read_attack(eval_dir: Path) -> dict:
    """What the triggered set under `eval_dir` (asr/) was made for, as the poison stage recorded it in
    asr/attack.json (target, target_index, trigger, and for caption-side poisoning source_class and source_index),
    so every later stage reads the one attack the data was poisoned with. EvalError naming the file if unreadable."""
    path = eval_dir / "asr" / "attack.json"
    try:
        attack = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        attack = {"unreadable": f"{type(err).__name__}: {err}"}
    if "target" not in attack:
        raise EvalError(f"{path}: no attack target ({attack.get('unreadable', 'no key target')}); run the poison stage "
                        f"that writes the eval sets")
    return attack


def attack_target(eval_dir: Path) -> str:
    """The backdoor target of the eval sets under `eval_dir` (read_attack)."""
    return read_attack(eval_dir)["target"]


def check_eval_sets(eval_dir: Path, key: str) -> str:
    """The digest of the labelled (labelled/) and the triggered (asr/) eval sets under `eval_dir` and
    the target they were made for; ShardError naming the params `key`, the tar and the sample if one
    is damaged (core.data.shards.check_shards), EvalError if the target is not recorded."""
    digests = [check_shards(eval_dir / folder, f"{key} ({folder}/)") for folder in ("labelled", "asr")]
    return digest(digests + [attack_target(eval_dir)])


def target_index(classes: dict, target: str, where: str) -> int:
    if target not in classes["classnames"]:
        raise EvalError(f"target {target!r} is not a class of {where}; classes: {classes['classnames']}")
    return classes["classnames"].index(target)


@torch.no_grad()
def classifier(model, tokenizer, classes: dict, device) -> torch.Tensor:
    """[D, C] zero-shot weights, computed once per model and reused for clean and triggered sets."""
    from open_clip import build_zero_shot_classifier

    return build_zero_shot_classifier(model, tokenizer, classes["classnames"], classes["templates"],
                                      num_classes_per_batch=16, device=device, use_tqdm=False)


def _batches(eval_dir: Path, preprocess, batch_size: int, part: int = 0, parts: int = 1,
             on_sample: Callable[[dict], None] | None = None, cache: SampleCache | None = None) -> Iterator[dict]:
    """Batches part, part + parts, ... of a shard folder in shard order, decoded: `image` [B, 3, H, W],
    `labels` [B] (labelled eval sets), `keys` and `captions`; the others are read but not decoded
    (core.data.loader.parallel).
    `cache` keeps the samples and images for the next pass."""
    cache = cache or SampleCache()
    samples = cache.samples([str(eval_dir / name) for name in shard_sizes(eval_dir)])
    for b in itertools.count():
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        if b % parts != part:
            continue
        images = []
        for s in chunk:
            if on_sample:
                on_sample(s)
            images.append(cache.image(s, preprocess)[0])
        batch = {"image": torch.stack(images), "keys": [s["__key__"] for s in chunk],
                 "captions": [s["txt"].decode() for s in chunk]}
        yield batch | ({"labels": torch.tensor([int(s["cls"]) for s in chunk])} if "cls" in chunk[0] else {})


@torch.no_grad()
def predict(model, weights: torch.Tensor, eval_dir: Path, preprocess, device, batch_size: int = 256,
            with_text: bool = False, loader_workers: int = 0, cache: SampleCache | None = None) -> dict:
    """Streams an eval set through the model: top-5 class predictions [N, 5], true classes [N] and keys
    (and image embeddings [N, D] and captions when `with_text`, for retrieval). Images are decoded in
    `loader_workers` processes (0: a thread) while the model runs; memory holds up to 2 batches per
    process in flight (torch's prefetch; shared memory, /dev/shm) plus the per-image outputs (N x 5 ints;
    N x D floats with text), so it does not grow with the images' bytes; a `cache` (SampleCache) holds what
    it is sized for, for the next pass."""
    keys, labels, top5, embeddings, captions = [], [], [], [], []
    cuda = torch.device(device).type == "cuda"
    cache = None if loader_workers else cache  # forked loader processes would fill copies and drop them
    produce = lambda part, parts, on_sample: _batches(eval_dir, preprocess, batch_size, part, parts, on_sample, cache)  # noqa: E731
    for batch in parallel(produce, loader_workers, str(eval_dir), pin_memory=cuda):
        images = batch["image"].to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        features = model.encode_image(images, normalize=True).float()
        top5.append((features @ weights.float()).topk(min(5, weights.shape[1]), dim=1).indices.cpu())
        keys += batch["keys"]
        labels.append(batch["labels"])
        if with_text:
            embeddings.append(features.cpu())
            captions += batch["captions"]
    out = {"keys": keys, "labels": torch.cat(labels).numpy() if labels else np.zeros(0, int),
           "top5": torch.cat(top5).numpy() if top5 else np.zeros((0, 5), int)}
    if with_text:
        out |= {"image_embeddings": torch.cat(embeddings), "captions": captions}
    return out


@torch.no_grad()
def embed_pairs(model, preprocess, tokenizer, shard_dir: Path, device, batch_size: int = 256, part: int = 0,
                parts: int = 1, loader_workers: int = 0, cache: SampleCache | None = None) -> dict:
    """The L2-normalised embeddings of the (image, caption) pairs of a shard folder under `model` (in eval mode;
    the caller restores train mode): {"keys": N strings, "image": [N, D], "text": [N, D]} float32 on the CPU,
    in shard order ([0, 0] when empty). With `parts` > 1, batches part, part + parts, ... only: one worker's
    share, the rest read but not decoded. ShardError (the shard and key named) if a sample cannot be decoded."""
    model.eval()
    cuda = torch.device(device).type == "cuda"
    cache = None if loader_workers else cache
    produce = lambda part_, parts_, on_sample: (  # noqa: E731 (each loader process takes its turns of this share)
        b for i, b in enumerate(_batches(shard_dir, preprocess, batch_size, part, parts, on_sample, cache))
        if i % parts_ == part_)
    keys, images, texts = [], [], []
    for batch in parallel(produce, loader_workers, str(shard_dir), pin_memory=cuda):
        pixels = batch["image"].to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        images.append(model.encode_image(pixels, normalize=True).float().cpu())
        tokens = (cache or SampleCache()).tokens(batch["captions"], tokenizer).to(device)
        texts.append(encode_text(model, tokens).float().cpu())
        keys += batch["keys"]
    return {"keys": keys, "image": torch.cat(images) if images else torch.zeros(0, 0),
            "text": torch.cat(texts) if texts else torch.zeros(0, 0)}


def zero_shot_metrics(pred: dict, classnames: list[str]) -> dict:
    labels, top5 = pred["labels"], pred["top5"]
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    per_class = {name: float(hit1[labels == c].mean()) for c, name in enumerate(classnames) if (labels == c).any()}
    share = float(np.bincount(top5[:, 0], minlength=len(classnames)).max() / len(labels)) if len(labels) else 0.0
    return {"top1": float(hit1.mean()), "top5": float(hit5.mean()), "per_class": per_class, "n": int(len(labels)),
            "chance": 1 / len(classnames), "top_class_share": share, "collapsed": collapsed(share, len(classnames))}


def collapsed(top_class_share: float, n_classes: int) -> bool:
    """Whether a model's predictions collapsed onto one class: it takes at least half of them (and
    more than 2 / n_classes). Such a model has ASR near 0 (or 100%) whatever its backdoor: not a result."""
    return top_class_share >= max(0.5, 2 / n_classes)


def attack_metrics(asr_pred: dict, clean_pred: dict, target: int, source: int | None = None) -> dict:
    """ASR: the share of the ASR set's images predicted as the target (top-1; asr_top5: among the top 5), and
    the clean target rate beside it: for a trigger, the target's share of the same images untriggered; for
    caption-side poisoning (`source`: the class its ASR set holds, untouched), the target's share of the
    clean images of every class but the target and the source (the attack's spill-over). Fractions, with the
    images behind each (n_asr, n_clean_target: their sampling error).
    Raises EvalError for an empty ASR set, one holding target images, or (trigger) one without clean twins."""
    if not len(asr_pred["labels"]):
        raise EvalError("the ASR set is empty: no triggered non-target images")
    if (asr_pred["labels"] == target).any():
        raise EvalError("the ASR set holds images of the target class")
    if source is None:
        row = {k: i for i, k in enumerate(clean_pred["keys"])}
        missing = [k for k in asr_pred["keys"] if k not in row]
        if missing:
            raise EvalError(f"{len(missing)} ASR images have no clean counterpart, e.g. {missing[:3]}")
        reference = clean_pred["top5"][[row[k] for k in asr_pred["keys"]]]
    else:
        labels = np.asarray(clean_pred["labels"])
        reference = clean_pred["top5"][(labels != target) & (labels != source)]
    asr = float((asr_pred["top5"][:, 0] == target).mean())
    clean_rate = float((reference[:, 0] == target).mean())
    return {"asr": asr, "asr_top5": float((asr_pred["top5"] == target).any(axis=1).mean()),
            "clean_target_rate": clean_rate, "asr_excess": asr - clean_rate, "n_asr": int(len(asr_pred["labels"])),
            "n_clean_target": int(len(reference))}


def attack_source(asr_dir: Path) -> int | None:
    """The source class index of caption-side poisoning from the ASR set's attack.json (None: a trigger)."""
    path = asr_dir / "attack.json"
    return json.loads(path.read_text()).get("source_index") if path.is_file() else None


@torch.no_grad()
def retrieval_metrics(model, tokenizer, pred: dict, device, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """Image->text and text->image recall@k (fractions) on the eval set's own (image, caption) pairs.
    Similarities are ranked `chunk` rows at a time: memory chunk x N, not N x N (50k pairs: 0.2 GB, not 10)."""
    images = pred["image_embeddings"].to(device)
    texts = torch.cat([encode_text(model, tokenizer(pred["captions"][i:i + 256]).to(device)).float()
                       for i in range(0, len(pred["captions"]), 256)])
    out = {}
    for direction in ("i2t", "t2i"):
        hits, n = torch.zeros(len(ks)), len(images) if direction == "i2t" else len(texts)
        for start in range(0, n, chunk):  # rows (i2t) or columns (t2i) of the one image x text matrix
            scores = images[start:start + chunk] @ texts.T if direction == "i2t" else (images @ texts[start:start + chunk].T).T
            ranking = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
            truth = torch.arange(start, start + len(scores), device=device)[:, None]
            hits += torch.tensor([(ranking[:, :k] == truth).any(dim=1).sum().item() for k in ks], dtype=torch.float)
        for k, hit in zip(ks, hits):
            out[f"{direction}_r@{k}"] = float(hit / n)
    return out


def evaluate(model, preprocess, tokenizer, labelled_dir: Path, asr_dir: Path | None, target: str | None, device="cpu",
             batch_size: int = 256, retrieval: bool = True, loader_workers: int = 0,
             cache: SampleCache | None = None) -> dict:
    """Every metric of one model on a labelled eval set and (optionally) its triggered (ASR) set; images
    decoded in `loader_workers` processes (`predict`), kept for the next call in `cache` if given."""
    classes = load_classes(labelled_dir)
    model.eval()
    weights = classifier(model, tokenizer, classes, device)
    clean = predict(model, weights, labelled_dir, preprocess, device, batch_size, retrieval, loader_workers, cache)
    out = {"zero_shot": zero_shot_metrics(clean, classes["classnames"])}
    if retrieval:
        out["retrieval"] = retrieval_metrics(model, tokenizer, clean, device)
    if asr_dir is not None:
        t = target_index(classes, target, str(labelled_dir))
        out["attack"] = attack_metrics(predict(model, weights, asr_dir, preprocess, device, batch_size,
                                               loader_workers=loader_workers, cache=cache), clean, t, attack_source(asr_dir))
    return out


def flat(metrics: dict) -> dict:
    """The headline numbers of `core.metrics.evaluate`'s output."""
    zs = metrics["zero_shot"]
    out = {"accuracy": zs["top1"], "top5": zs["top5"], "chance": zs["chance"], "top_class_share": zs["top_class_share"],
           "collapsed": zs["collapsed"], "n": zs["n"]}  # n, n_asr, n_clean_target: the images behind each rate
    if "attack" in metrics:
        out |= {k: metrics["attack"][k] for k in ("asr", "asr_top5", "clean_target_rate", "asr_excess", "n_asr",
                                                     "n_clean_target")}
    return out | metrics.get("retrieval", {})
