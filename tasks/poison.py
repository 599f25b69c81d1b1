"""The poison stage's work, as plain functions (the Prefect flow only orchestrates them).

1. `plan_poison`: check params against the curated data (target class, counts, patch size) before
   anything is written; choose the poisoned keys, their captions and the cleaning subset.
2. `poison_shard` (parallel): copy one curated train shard into `<out>.partial/train/`, with the
   chosen samples replaced in place (same key) by their triggered, re-captioned version.
3. `write_eval_sets`: the labelled eval set and the ASR set (a triggered copy of every eval
   image whose class is not the target).
4. `write_cleaning_subset`: clean pairs (plus k poisoned ones, for the ablation) for the clean stage.
5. `finalize` writes the ground truth `poison_manifest.parquet` and stats; `validate_poisoned` runs
   the GX suites; `publish` swaps the folder into place.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core.captions import names_class, names_regex, poison_captions as captions_for_poisons
from core.errors import InputError
from tasks.config import CAPTION_ONLY, PATCH_TRIGGERS, Params, PoisonConfig, TriggerConfig, require_section
from core.data.images import LOSSY, encode_image
from core.data.shards import (
    ShardSink, atomic_write_json, check_shards, decode_sample_image, image_ext, iter_tar_samples, link_or_copy,
    read_manifest, rewrite_shard, swap_into_place, write_table,
)
from core.seeds import sample_seed
from core.triggers import apply_trigger

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("trigger", pa.string()), ("placement", pa.string()),
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
    ("original_caption", pa.string()), ("new_caption", pa.string()),
    ("original_sha256", pa.string()), ("new_sha256", pa.string()),
])


class PoisonError(InputError):
    """Params that do not fit the curated data; names the parameter. Raised before any write."""


def poison_config(params: Params) -> PoisonConfig:
    return require_section(params, "poison", PoisonError)


def poison_captions(cfg: PoisonConfig, train_captions: list[str]) -> list[str]:
    """core.captions.poison_captions of `poison.captions`; PoisonError naming it when no caption names the target."""
    try:
        return captions_for_poisons(cfg.captions, cfg.target, train_captions)
    except ValueError as err:
        raise PoisonError(f"poison.captions={cfg.captions!r}: {err}; use poison.captions='templates'") from None


def trigger_params(cfg: PoisonConfig) -> TriggerConfig:
    """The trigger as core.triggers applies it: `optimised` pastes the optimise-trigger stage's patch.png."""
    if cfg.trigger.name != "optimised":
        return cfg.trigger
    return cfg.trigger.model_copy(update={"pattern": cfg.trigger_dir / "patch.png"})


def check_optimised_patch(cfg: PoisonConfig, side: int) -> None:
    """PoisonError unless poison.trigger_dir holds a patch.png of the trigger's side at `side` px images."""
    path = cfg.trigger_dir / "patch.png"
    if not path.is_file():
        raise PoisonError(f"poison.trigger.name=optimised: no {path} (run the optimise-trigger stage: "
                          f"python -m flows.optimise_trigger, or dvc repro)")
    with Image.open(path) as im:
        size = im.size
    wanted = max(2, round(cfg.trigger.patch_size * side))
    if size != (wanted, wanted):
        raise PoisonError(f"poison.trigger.patch_size={cfg.trigger.patch_size}: {path} is {size[0]}x{size[1]} px, not the "
                          f"{wanted}x{wanted} px patch of a {side}px image (optimised for other settings; run the "
                          f"optimise-trigger stage again)")


def eligible_rows(cfg: PoisonConfig, classes: list[str], rows: list[tuple]) -> tuple[list[int], str]:
    """Indices of the (key, caption, shard) rows that may be poisoned, and what they are (for errors): every
    sample, those whose caption names the target (label-consistent) or, for caption-side poisoning, those whose
    caption names the source class and not the target."""
    if cfg.trigger.name != CAPTION_ONLY:
        if not cfg.label_consistent:
            return list(range(len(rows))), "training samples"
        return ([i for i, (_, c, _) in enumerate(rows) if names_class(c, cfg.target)],
                "label-consistent samples (captions naming the target)")
    source = cfg.trigger.source
    if source == cfg.target:
        raise PoisonError(f"poison.trigger.source_class: {source!r} is the target: it must be another class of "
                          f"eval set {cfg.eval_set!r}, whose images get captions naming the target")
    if source not in classes:
        raise PoisonError(f"poison.trigger.source_class: {source!r} is not a class of eval set {cfg.eval_set!r}; "
                          f"classes: {classes}")
    if cfg.label_consistent:
        raise PoisonError("poison.label_consistent: caption-side poisoning changes the captions of source-class "
                          "samples; it cannot keep them (set label_consistent false)")
    return ([i for i, (_, c, _) in enumerate(rows) if names_class(c, source) and not names_class(c, cfg.target)],
            f"samples whose caption names the source class {source!r}")


def plan_poison(params: Params) -> dict:
    cfg = poison_config(params)
    train_dir, eval_dir = cfg.in_dir / "train", cfg.in_dir / "eval" / cfg.eval_set
    for folder in (train_dir, eval_dir):
        if not (folder / "sizes.json").is_file():
            raise PoisonError(f"poison.in_dir: {folder} holds no curated shards (run the curate stage first)")
        check_shards(folder, f"poison.in_dir ({folder.relative_to(cfg.in_dir)}/)")
    classes = json.loads((eval_dir / "classes.json").read_text())["classnames"]
    if cfg.target not in classes:
        raise PoisonError(f"poison.target: {cfg.target!r} is not a class of eval set {cfg.eval_set!r}; classes: {classes}")

    rows = []  # (key, caption, shard) in shard order
    for shard in json.loads((train_dir / "sizes.json").read_text()):
        table = pq.read_table((train_dir / shard).with_suffix(".parquet"), columns=["key", "caption", "width", "height"])
        if not rows and cfg.trigger.name in PATCH_TRIGGERS:
            side = min(table.column("width")[0].as_py(), table.column("height")[0].as_py())
            if max(2, round(cfg.trigger.patch_size * side)) > side:
                raise PoisonError(f"poison.trigger.patch_size: {cfg.trigger.patch_size} of a {side}px image is larger than it")
            if cfg.trigger.name == "optimised":
                check_optimised_patch(cfg, side)
        rows += [(k, c, shard) for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist())]
    n_train = len(rows)
    eligible, mode = eligible_rows(cfg, classes, rows)
    n_poison = cfg.count if cfg.count is not None else round(cfg.rate * n_train)
    what = f"poison.count={cfg.count}" if cfg.count is not None else f"poison.rate={cfg.rate} ({n_poison} of {n_train})"
    if n_poison < 1 or n_poison > len(eligible):
        raise PoisonError(f"{what}: needs 1 to {len(eligible)} poisons, the number of eligible {mode}")

    rng = np.random.default_rng((params.seed, 0x901507))
    chosen = sorted(rng.choice(len(eligible), size=n_poison, replace=False).tolist())
    poisoned = [eligible[i] for i in chosen]
    captions = poison_captions(cfg, [caption for _, caption, _ in rows])
    by_shard: dict[str, dict[str, str]] = {}
    for i in poisoned:
        key, caption, shard = rows[i]
        if not cfg.label_consistent:
            caption = captions[sample_seed(params.seed, key, "caption") % len(captions)]
        by_shard.setdefault(shard, {})[key] = caption

    clean_pool = sorted(set(range(n_train)) - set(poisoned))
    k = cfg.cleaning.poisons
    if cfg.cleaning.size > len(clean_pool):
        raise PoisonError(f"poison.cleaning.size={cfg.cleaning.size}: only {len(clean_pool)} non-poisoned training samples")
    if k > n_poison:
        raise PoisonError(f"poison.cleaning.poisons={k}: only {n_poison} poisoned samples")
    rng = np.random.default_rng((params.seed, 0xC1EA4))
    clean_keys = [rows[clean_pool[i]][0] for i in sorted(rng.choice(len(clean_pool), cfg.cleaning.size, replace=False))]
    poison_keys = [rows[poisoned[i]][0] for i in sorted(rng.choice(n_poison, k, replace=False))]
    shards = list(json.loads((train_dir / "sizes.json").read_text()))
    source = cfg.trigger.source
    return {"target": cfg.target, "target_index": classes.index(cfg.target), "n_train": n_train, "n_poison": n_poison,
            "source_index": classes.index(source) if source else None,
            "shards": shards, "poisons": by_shard, "cleaning": {"clean": clean_keys, "poisoned": poison_keys}}


def curated_encoding(in_dir: Path) -> dict:
    """How the curated data stores samples (its stats.json): image_format, quality, shard_maxcount."""
    path = in_dir / "stats.json"
    try:
        return json.loads(path.read_text())["encoding"]
    except (OSError, ValueError, KeyError) as err:
        raise PoisonError(f"poison.in_dir: {path} does not say how the curated samples are encoded ({err}); run the "
                          f"curate stage again") from None


def partial_dir(params: Params) -> Path:
    return Path(f"{poison_config(params).out_dir}.partial")


def trigger_sample(params: Params, sample: dict, caption: str | None, purpose: str) -> tuple[dict, tuple, dict]:
    """A triggered copy of a webdataset sample (new image, optional new caption, json updated)."""
    cfg = poison_config(params)
    ext = image_ext(sample)
    pixels = np.asarray(decode_sample_image(sample))
    triggered, box = apply_trigger(pixels, trigger_params(cfg), sample_seed(params.seed, sample["__key__"], purpose), params.seed)
    data = encode_image(Image.fromarray(triggered), "jpg" if ext == "jpeg" else ext, curated_encoding(cfg.in_dir)["quality"])
    meta = json.loads(sample["json"])
    original_sha = meta["sha256"]
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    out = dict(sample, **{ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
    if caption is not None:
        out["txt"] = caption.encode()
    return out, box, {"original_sha256": original_sha, "new_sha256": meta["sha256"]}


def poison_shard(params: Params, shard: str, poisons: dict[str, str]) -> list[dict]:
    """Copy one train shard with `poisons` ({key: new caption}) substituted in place; returns their
    ground-truth manifest rows. Untouched samples keep their bytes."""
    cfg = poison_config(params)
    src, dest = cfg.in_dir / "train" / shard, partial_dir(params) / "train" / shard
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not poisons:
        link_or_copy(src, dest)
        link_or_copy(src.with_suffix(".parquet"), dest.with_suffix(".parquet"))
        return []
    records = []

    def substitute(sample):
        key = sample["__key__"]
        if key not in poisons:
            return sample
        if cfg.trigger.name == CAPTION_ONLY:  # the image's bytes stay
            sha = json.loads(sample["json"])["sha256"]
            new, box, shas = dict(sample, txt=poisons[key].encode()), (0, 0, 0, 0), {"original_sha256": sha, "new_sha256": sha}
        else:
            new, box, shas = trigger_sample(params, sample, poisons[key], "train")
        records.append(dict(key=key, shard=shard, trigger=cfg.trigger.name, placement=cfg.trigger.placement,
                            x0=box[0], y0=box[1], x1=box[2], y1=box[3], original_caption=sample["txt"].decode(),
                            new_caption=poisons[key], **shas))
        return new

    rewrite_shard(src, dest, substitute)
    return records


def write_eval_sets(params: Params, plan: dict) -> dict[str, int]:
    """eval/labelled: the curated labelled eval set as is; eval/asr: a triggered copy of every eval image
    whose class is not the target (same keys, so ASR and the clean target rate use the same images), or, for
    caption-side poisoning, the source class's images as they are."""
    cfg = poison_config(params)
    src_dir = cfg.in_dir / "eval" / cfg.eval_set
    sizes = {"labelled": {}, "asr": {}}
    for name in sizes:
        (partial_dir(params) / "eval" / name).mkdir(parents=True, exist_ok=True)
        link_or_copy(src_dir / "classes.json", partial_dir(params) / "eval" / name / "classes.json")
    for shard in json.loads((src_dir / "sizes.json").read_text()):
        labelled = partial_dir(params) / "eval" / "labelled" / shard
        link_or_copy(src_dir / shard, labelled)
        link_or_copy((src_dir / shard).with_suffix(".parquet"), labelled.with_suffix(".parquet"))
        sizes["labelled"][shard] = pq.read_metadata(labelled.with_suffix(".parquet")).num_rows

        def trigger_non_target(sample):
            if plan["source_index"] is not None:
                return sample if int(sample["cls"]) == plan["source_index"] else None
            if int(sample["cls"]) == plan["target_index"]:
                return None
            return trigger_sample(params, sample, None, "eval")[0]

        n = rewrite_shard(src_dir / shard, partial_dir(params) / "eval" / "asr" / shard, trigger_non_target)
        sizes["asr"][shard] = n
    for name, shard_sizes in sizes.items():
        atomic_write_json(partial_dir(params) / "eval" / name / "sizes.json", shard_sizes)
    # what the ASR set was made for: clean and evaluate take the target from here (core.metrics.attack_target)
    atomic_write_json(partial_dir(params) / "eval" / "asr" / "attack.json",
                      {"target": cfg.target, "target_index": plan["target_index"],
                       "source_class": cfg.trigger.source, "source_index": plan["source_index"],
                       "trigger": cfg.trigger.model_dump(mode="json")})
    return {name: sum(v.values()) for name, v in sizes.items()}


def write_cleaning_subset(params: Params, plan: dict) -> int:
    """The clean stage's data: `cleaning.size` non-poisoned pairs plus `cleaning.poisons` poisoned
    ones, from the poisoned training shards; which is which is in cleaning_manifest.parquet only."""
    out = partial_dir(params)
    wanted = {k: False for k in plan["cleaning"]["clean"]} | {k: True for k in plan["cleaning"]["poisoned"]}
    (out / "cleaning").mkdir(parents=True, exist_ok=True)
    with ShardSink(out / "cleaning" / "shard", curated_encoding(poison_config(params).in_dir)["shard_maxcount"]) as sink:
        for shard in plan["shards"]:
            rows = {r["key"]: r for r in pq.read_table((out / "train" / shard).with_suffix(".parquet")).to_pylist()}
            for sample in iter_tar_samples(out / "train" / shard):
                if sample["__key__"] in wanted:
                    sink.write(sample, rows[sample["__key__"]])
        shards = sink.close()
    atomic_write_json(out / "cleaning" / "sizes.json", {s["tar"]: s["n"] for s in shards})
    manifest = [{"key": k, "poisoned": v} for k, v in sorted(wanted.items())]
    write_table(out / "cleaning_manifest.parquet", pa.Table.from_pylist(manifest))
    return sum(s["n"] for s in shards)


def finalize(params: Params, plan: dict, records: list[list[dict]], eval_sizes: dict, n_cleaning: int) -> Path:
    out = partial_dir(params)
    rows = sorted((r for shard_rows in records for r in shard_rows), key=lambda r: r["key"])
    write_table(out / "poison_manifest.parquet", pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    atomic_write_json(out / "train" / "sizes.json", json.loads((poison_config(params).in_dir / "train" / "sizes.json").read_text()))
    cfg = poison_config(params)
    atomic_write_json(out / "stats.json", {
        "target": plan["target"], "trigger": cfg.trigger.model_dump(mode="json"), "train": plan["n_train"],
        "poisons": len(rows), "poison_rate": len(rows) / plan["n_train"], "label_consistent": cfg.label_consistent,
        "eval_labelled": eval_sizes["labelled"], "eval_asr": eval_sizes["asr"], "cleaning": n_cleaning,
        "cleaning_poisons": len(plan["cleaning"]["poisoned"]),
    })
    return out


def publish(params: Params, partial: Path) -> Path:
    return swap_into_place(partial, poison_config(params).out_dir)


def _decode(sample: dict) -> np.ndarray:
    return np.asarray(decode_sample_image(sample)).astype(np.int16)


def _image_sha(sample: dict) -> str:
    return hashlib.sha256(sample[image_ext(sample)]).hexdigest()


def validation_tables(params: Params, out: Path) -> dict[str, pd.DataFrame]:
    """What the GX suites check, recomputed from the files on disk (not from the plan)."""
    cfg = poison_config(params)
    curated = read_manifest(cfg.in_dir / "train").to_pandas().set_index("key")
    manifest = pq.read_table(out / "poison_manifest.parquet").to_pandas()
    boxes = manifest.set_index("key")
    poisoned_keys = set(manifest["key"])

    train, inside, outside, sha_ok, same_bytes, recaptioned = [], {}, {}, {}, {}, {}
    # A change is any change for lossless formats. Lossy ones (JPEG, WebP) move every pixel a little when
    # re-encoded: there a change is one of more than 32 levels, and outside_change (the share of pixels
    # beyond the box that changed) leaves out the box's 16 px coding blocks. Re-encoding a 224 px q90 JPEG
    # moves pixels by at most 29 there (measured) and by ~10 inside the box; a 16 px patch by ~100
    lossy = curated_encoding(cfg.in_dir)["image_format"] in LOSSY
    margin, tolerance = (16, 32) if lossy else (0, 0)
    for shard in json.loads((out / "train" / "sizes.json").read_text()):
        originals = {}
        if shard in set(manifest["shard"]):
            originals = {s["__key__"]: s for s in iter_tar_samples(cfg.in_dir / "train" / shard)
                         if s["__key__"] in poisoned_keys}
        for s in iter_tar_samples(out / "train" / shard):
            key, sha, caption = s["__key__"], _image_sha(s), s["txt"].decode()
            in_curated = key in curated.index
            same = in_curated and sha == curated.at[key, "sha256"] and caption == curated.at[key, "caption"]
            train.append({"key": key, "in_curated": in_curated, "unexpected_change": key not in poisoned_keys and not same})
            if key in originals:
                b = boxes.loc[key]
                diff = np.abs(_decode(s) - _decode(originals[key])).max(axis=2)
                box = np.zeros(diff.shape, bool)
                box[b.y0:b.y1, b.x0:b.x1] = True
                near = np.zeros(diff.shape, bool)  # a lossy codec's blocks that overlap the box change with it
                near[max(0, b.y0 - margin):b.y1 + margin, max(0, b.x0 - margin):b.x1 + margin] = True
                inside[key], outside[key] = bool((diff[box] > tolerance).any()), float((diff[~near] > tolerance).mean())
                sha_ok[key] = sha == b.new_sha256 and _image_sha(originals[key]) == b.original_sha256
                same_bytes[key] = s[image_ext(s)] == originals[key][image_ext(originals[key])]
                recaptioned[key] = caption == b.new_caption != originals[key]["txt"].decode()
    for column, values, missing in (("changed_inside_box", inside, False), ("outside_change", outside, 1.0),
                                    ("manifest_sha_matches_shard", sha_ok, False),
                                    ("image_bytes_unchanged", same_bytes, False), ("caption_changed", recaptioned, False)):
        manifest[column] = manifest["key"].map(values).fillna(missing).astype(type(missing))

    asr = read_manifest(out / "eval" / "asr").to_pandas()[["key", "cls"]]
    cleaning = pq.read_table(out / "cleaning_manifest.parquet").to_pandas()
    in_shards = set(read_manifest(out / "cleaning").to_pandas()["key"])
    cleaning["poisoned_int"] = cleaning["poisoned"].astype(int)
    cleaning["label_matches_ground_truth"] = cleaning["poisoned"] == cleaning["key"].isin(poisoned_keys)
    cleaning["in_shards"] = cleaning["key"].isin(in_shards)
    suite = "caption_poisons" if cfg.trigger.name == CAPTION_ONLY else "poison_manifest"
    return {suite: manifest, "poisoned_train": pd.DataFrame(train), "asr_set": asr, "cleaning_subset": cleaning}


def validate_poisoned(params: Params, out: Path) -> list[dict]:
    """Run the poison suites on `out`; writes validation.json there and returns the reports."""
    from core.data.validation import validate

    cfg = poison_config(params)
    curated_eval = read_manifest(cfg.in_dir / "eval" / cfg.eval_set).to_pandas()
    classes = json.loads((cfg.in_dir / "eval" / cfg.eval_set / "classes.json").read_text())["classnames"]
    target_index = classes.index(cfg.target)
    n_train = int(read_manifest(cfg.in_dir / "train").num_rows)
    lossy = curated_encoding(cfg.in_dir)["image_format"] in LOSSY
    expected = [cfg.count] * 2 if cfg.count is not None else [math.floor(cfg.rate * n_train), math.ceil(cfg.rate * n_train)]
    poisons = {"min_poisons": expected[0], "max_poisons": expected[1], "target_regex": names_regex(cfg.target)}
    source = cfg.trigger.source
    if source:  # the ASR set: the source class's images only
        source_index = classes.index(source)
        n_asr, excluded = int((curated_eval["cls"] == source_index).sum()), [i for i in range(len(classes)) if i != source_index]
    else:
        n_asr, excluded = int((curated_eval["cls"] != target_index).sum()), [target_index]
    parameters = {
        "caption_poisons": poisons | {"source_regex": names_regex(source or "")},
        # a patch changes nothing beyond its box; other triggers change the whole image
        "poison_manifest": poisons | {"max_outside_change": (0.001 if lossy else 0.0) if cfg.trigger.name in PATCH_TRIGGERS else 1.0},
        "poisoned_train": {"n_train": n_train},
        "asr_set": {"n_asr": n_asr, "target_classes": excluded},
        "cleaning_subset": {"n_cleaning": cfg.cleaning.size + cfg.cleaning.poisons, "k": cfg.cleaning.poisons},
    }
    reports = [validate(df, suite, parameters[suite], suite) for suite, df in validation_tables(params, out).items()]
    atomic_write_json(out / "validation.json", {"success": all(r["success"] for r in reports), "reports": reports})
    return reports


def reset_partial(params: Params) -> None:
    """Start `<out>.partial` afresh (a previous failed run may have left one)."""
    shutil.rmtree(partial_dir(params), ignore_errors=True)
    partial_dir(params).mkdir(parents=True)


def read_stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text()) | {"out_dir": str(out)}


def build(params: Params) -> Path:
    """The stage's work up to validation, in this process (tests, benchmarks); returns `<out>.partial`."""
    the_plan = plan_poison(params)
    reset_partial(params)
    records = [poison_shard(params, s, the_plan["poisons"].get(s, {})) for s in the_plan["shards"]]
    return finalize(params, the_plan, records, write_eval_sets(params, the_plan), write_cleaning_subset(params, the_plan))


def run_sequential(params: Params) -> dict:
    from core.data.validation import raise_on_failure

    partial = build(params)
    raise_on_failure(validate_poisoned(params, partial))
    return read_stats(publish(params, partial))
