"""Typed, validated view of params.yaml.

Every knob of the pipeline lives in params.yaml; this module turns it into pydantic
objects so that an unknown key, a wrong type or an out-of-range value is reported,
with the dotted key and what was expected, before any stage does work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator,
)

from core.errors import InputError
from defences import OPTIONS as DEFENCES, PRETRAINING as PRETRAINING_DEFENCES
from detectors import OPTIONS as DETECTORS
from objectives import WEIGHTS as OBJECTIVES

# the pipeline's order (dvc.yaml), a section each (section_of: optimise-trigger reads optimise_trigger)
STAGES = ("curate", "optimise-trigger", "poison", "pretrain", "detect", "clean", "evaluate")
SOURCE_NAME = r"^[a-z][a-z0-9]{0,15}$"  # becomes the key prefix: no dots, underscores or slashes


class ConfigError(InputError):
    """A params file that does not validate; the message names every bad key."""


def _not_bool(value):
    if isinstance(value, bool):  # pydantic's lax mode reads `true` as 1.0
        raise ValueError("got a boolean where a number is expected")
    return value


# Numbers in params: StrictInt refuses `true` (read as 1: `epochs: true` would train one epoch) and 2.5;
# Real refuses booleans, and Strict's allow_inf_nan=False refuses `.inf` and `.nan` with their key.
Real = Annotated[float, BeforeValidator(_not_bool)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Section(Strict):
    """A stage's section. Its fields fall in four kinds, which decide a run's identity (resume only
    the same computation) and the stage's `params` in dvc.yaml (tests/test_layout.py checks both):
    - PATHS: input and output folders; in dvc.yaml as deps and outs, not params;
    - OPERATIONAL: how and where the work runs (workers, runner, threads, logging, kept
      checkpoints); they never change a result, so they are in neither;
    - RUNS: which runs to make (objectives, models, learning rates); in dvc.yaml's params, while a
      run's identity holds only its own element;
    - CHECKS: validation thresholds; in dvc.yaml's params (a change re-checks), not in identities;
    - MATRIX: the axes of a dvc.yaml `matrix` (clean's models and defences): each element is a stage
      of its own, so the lists are not params of any one of them;
    every other field changes what a run computes: in both."""

    PATHS: ClassVar[frozenset[str]] = frozenset()
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()
    RUNS: ClassVar[frozenset[str]] = frozenset()
    CHECKS: ClassVar[frozenset[str]] = frozenset()
    MATRIX: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict:
        """The settings that change what one run computes (JSON values), for run identities."""
        return self.model_dump(mode="json", exclude=set(self.PATHS | self.OPERATIONAL | self.RUNS | self.CHECKS))

    @classmethod
    def dvc_params(cls) -> set[str]:
        """The fields dvc.yaml lists under the stage's `params`."""
        return set(cls.model_fields) - cls.PATHS - cls.OPERATIONAL - cls.MATRIX


class GeneratedSource(Strict):
    """The built-in procedural corpus of captioned shapes (core/data/corpus.py)."""

    kind: Literal["generated"]
    name: Annotated[str, Field(pattern=SOURCE_NAME)] = "gen"
    train_pairs: Annotated[StrictInt, Field(ge=1)] = 10_000
    eval_per_class: Annotated[StrictInt, Field(ge=0)] = 240  # 2,400 triggered images: ASR +-2 points (95%, at 50%)
    supersample: Annotated[StrictInt, Field(ge=1, le=4)] = 2
    typical_color_prob: Annotated[Real, Field(ge=0, le=1)] = 0.5
    caption_noise: Annotated[Real, Field(ge=0, le=1)] = 0.1
    max_clutter: Annotated[StrictInt, Field(ge=0, le=32)] = 4
    noise_std: Annotated[Real, Field(ge=0, le=128)] = 6.0
    min_scale: Annotated[Real, Field(gt=0, le=1)] = 0.25
    max_scale: Annotated[Real, Field(gt=0, le=1)] = 0.45

    @model_validator(mode="after")
    def _scale_order(self):
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must be <= max_scale ({self.max_scale})")
        return self


class TextSource(Strict):
    # Python codec name of the source's text; utf-8-sig reads UTF-8 with or without a byte-order
    # mark (Excel and Notepad write one).
    encoding: str = "utf-8-sig"

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        try:
            "".encode(value)  # LookupError also for codecs that are not text encodings (hex, zlib)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r} (a Python codec name: utf-8-sig, cp1252, latin-1, "
                             f"utf-16, ...)") from None
        return value


class CsvSource(TextSource):
    """CleanCLIP's format: a CSV of image path (relative to the CSV) and caption."""

    kind: Literal["csv"]
    name: Annotated[str, Field(pattern=SOURCE_NAME)]
    path: Path
    sep: Annotated[str, Field(min_length=1, max_length=1)] = ","
    image_column: str = "image"
    caption_column: str = "caption"


class WebdatasetSource(TextSource):
    """img2dataset / webdataset shards: a brace pattern or a glob of .tar files; `encoding` is that
    of the `.txt` captions (a caption not in it is quarantined as undecodable_caption)."""

    kind: Literal["webdataset"]
    name: Annotated[str, Field(pattern=SOURCE_NAME)]
    urls: Annotated[str, Field(min_length=1)]


class ImageFolderSource(TextSource):
    """ImageNet layout (root/<class>/<image>): becomes a labelled eval set; `encoding` is that of the
    `classnames` file."""

    kind: Literal["image_folder"]
    name: Annotated[str, Field(pattern=SOURCE_NAME)]
    root: Path
    # Folder -> class name file (JSON object, or CSV/TSV rows of folder,name); without it, ImageNet
    # synset folders (n07753592) get open_clip's ImageNet names and other folders their own name.
    classnames: Path | None = None


Source = Annotated[
    Union[GeneratedSource, CsvSource, WebdatasetSource, ImageFolderSource],
    Field(discriminator="kind"),
]


class CaptionConfig(Strict):
    min_chars: Annotated[StrictInt, Field(ge=1)] = 3
    max_chars: Annotated[StrictInt, Field(ge=1)] = 256

    @model_validator(mode="after")
    def _order(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})")
        return self


class RunnerConfig(Strict):
    """Where mapped Prefect tasks run: a local process pool, threads, or a Ray cluster."""

    kind: Literal["process", "thread", "ray"] = "process"
    workers: Annotated[StrictInt, Field(ge=1)] = 2
    address: str | None = None  # ray only: None starts a local Ray, "auto" joins RAY_ADDRESS


class ValidationConfig(Strict):
    # Least share of rows whose image no other row of the folder holds (stats.json reports the
    # complement as repeated_images). 0 checks nothing: web data and caption sets such as COCO hold
    # the same image under several captions, which curate keeps (it de-duplicates image+caption);
    # raise it to stop on placeholder images that a downloader saved for many dead links.
    sha256_unique_mostly: Annotated[Real, Field(ge=0, le=1)] = 0.0


def _known(names, registry: dict, kind: str):
    """`names` if each is in `registry` (objectives.WEIGHTS, defences.OPTIONS), else the first unknown named."""
    for name in names:
        if name not in registry:
            raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {sorted(registry)}")
    return names


def _known_options(mapping: dict, registry: dict, kind: str, called: str) -> dict:
    """`mapping` ({name: {option: value}}) if every name and option is known to `registry`."""
    _known(mapping, registry, kind)
    for name, options in mapping.items():
        unknown = sorted(set(options) - set(registry[name]))
        if unknown:
            raise ValueError(f"{name}: {unknown} not accepted; {name} takes {called} {registry[name] or 'none'}")
    return mapping


def _names(registry: dict, kind: str) -> AfterValidator:
    """A field's check that each name it lists is in `registry` (objectives.WEIGHTS, defences.OPTIONS, ...)."""
    return AfterValidator(lambda names: _known(names, registry, kind))


def _options(registry: dict, kind: str, called: str = "options") -> AfterValidator:
    """A field's check of {name: {option: value}}: every name and option known to `registry`."""
    return AfterValidator(lambda mapping: _known_options(mapping, registry, kind, called))


class CurateConfig(Section):
    PATHS = frozenset({"out_dir", "staging_dir"})
    OPERATIONAL = frozenset({"runner"})
    CHECKS = frozenset({"validation"})

    out_dir: Path = Path("data/curated")
    staging_dir: Path = Path("data/staging/curate")
    image_size: Annotated[StrictInt, Field(ge=8, le=1024)] = 32
    resize_mode: Literal["center_crop", "border", "squash"] = "center_crop"
    image_format: Literal["png", "jpg", "webp"] = "png"
    quality: Annotated[StrictInt, Field(ge=1, le=100)] = 95
    min_image_side: Annotated[StrictInt, Field(ge=1)] = 8
    max_image_pixels: Annotated[StrictInt, Field(ge=1)] = 89_478_485  # PIL's default bomb limit
    caption: CaptionConfig = CaptionConfig()
    shard_maxcount: Annotated[StrictInt, Field(ge=1)] = 2_000
    runner: RunnerConfig = RunnerConfig()
    validation: ValidationConfig = ValidationConfig()
    sources: Annotated[list[Source], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        return self


PATCH_TRIGGERS = ("noise_patch", "fixed_patch", "yellow", "optimised")
WHOLE_IMAGE_TRIGGERS = ("blended", "sig", "wanet")
CAPTION_ONLY = "caption"  # no pixel trigger: the poisons keep their images (caption-side poisoning)


class TriggerConfig(Strict):
    """A backdoor trigger (core/triggers.py), or `caption` for caption-side poisoning (Carlini & Terzis, ICLR 2022;
    Yang et al., ICML 2023): images of `source_class` keep their pixels and get captions naming the target, so the
    source class itself becomes the trigger. `optimised` pastes the optimise-trigger stage's patch. Defaults are the study's."""

    name: Literal["noise_patch", "fixed_patch", "yellow", "optimised", "blended", "sig", "wanet", "caption"] = "noise_patch"
    patch_size: Annotated[Real, Field(gt=0, le=1)] = 0.375  # side relative to the image side (>= 2 px); the study: 16/224
    # random | a corner | fixed (at `position`) for patch triggers; whole for blended, sig, wanet.
    # None picks random for patch triggers and whole for the others.
    placement: Literal["random", "top_left", "top_right", "bottom_left", "bottom_right", "fixed", "whole", "none"] | None = None
    position: tuple[Annotated[Real, Field(ge=0, le=1)], Annotated[Real, Field(ge=0, le=1)]] = (0.5, 0.5)
    pattern: Path | None = None  # fixed_patch: an image file; default a black-and-white checkerboard
    alpha: Annotated[Real, Field(ge=0, le=1)] = 0.8  # blended: alpha * image + (1 - alpha) * noise
    sig_amplitude: Annotated[Real, Field(gt=0, le=255)] = 60.0  # sig: on the 0-255 scale
    sig_periods: Annotated[StrictInt, Field(ge=1)] = 6
    wanet_grid: Annotated[StrictInt, Field(ge=2, le=64)] = 4  # wanet: control points per side
    wanet_strength: Annotated[Real, Field(gt=0, le=4)] = 0.5
    source_class: str | None = None  # caption: the class whose images are re-captioned (a class of poison.eval_set); others ignore it

    @property
    def source(self) -> str | None:
        """The source class of caption-side poisoning; None for a trigger (which ignores source_class)."""
        return self.source_class if self.name == CAPTION_ONLY else None

    @model_validator(mode="after")
    def _placement_fits_trigger(self):
        if self.name == CAPTION_ONLY:  # it touches no pixels: placement is none whatever the (shared) params say
            if self.source_class is None:
                raise ValueError("trigger 'caption' needs source_class: the class whose images get target captions")
            object.__setattr__(self, "placement", "none")
            return self
        if self.pattern is not None and self.name != "fixed_patch":
            raise ValueError(f"pattern is fixed_patch's image; {self.name!r} takes none (optimised: the "
                             f"optimise-trigger stage's patch.png in poison.trigger_dir)")
        if self.placement == "none":
            raise ValueError(f"placement 'none' is trigger 'caption''s; {self.name!r} takes random, a corner, fixed or whole")
        whole = self.name in WHOLE_IMAGE_TRIGGERS
        if self.placement is None:
            object.__setattr__(self, "placement", "whole" if whole else "random")
        elif whole != (self.placement == "whole"):
            raise ValueError(f"placement {self.placement!r} does not fit trigger {self.name!r}: "
                             f"{', '.join(WHOLE_IMAGE_TRIGGERS)} take 'whole'; patch triggers take random, a corner or fixed")
        return self


class CleaningSubsetConfig(Strict):
    size: Annotated[StrictInt, Field(ge=1)] = 2_000  # clean pairs (the study: 100K)
    poisons: Annotated[StrictInt, Field(ge=0)] = 0  # poisoned pairs added (the study's ablation: 1 to 25)


class PoisonConfig(Section):
    PATHS = frozenset({"in_dir", "out_dir", "trigger_dir"})
    OPERATIONAL = frozenset({"runner"})

    in_dir: Path = Path("data/curated")
    out_dir: Path = Path("data/poisoned")
    trigger_dir: Path = Path("data/trigger")  # the optimise-trigger stage's output: patch.png for trigger `optimised`
    eval_set: Annotated[str, Field(pattern=SOURCE_NAME)] = "gen"  # the curated eval set (source name) to trigger
    target: Annotated[str, Field(min_length=1)] = "banana"
    count: Annotated[StrictInt, Field(ge=1)] | None = None  # exactly one of count and rate
    rate: Annotated[Real, Field(gt=0, lt=1)] | None = None
    label_consistent: bool = False  # poison only samples whose caption names the target; keep captions
    # The poisons' new captions: "templates" (the study's: open_clip's 80 ImageNet prompts naming the target)
    # or "corpus" (captions of training samples that name the target, so poisons look like the rest of the data)
    captions: Literal["templates", "corpus"] = "corpus"
    trigger: TriggerConfig = TriggerConfig()
    cleaning: CleaningSubsetConfig = CleaningSubsetConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _count_or_rate(self):
        if (self.count is None) == (self.rate is None):
            raise ValueError(f"set exactly one of count and rate (got count={self.count}, rate={self.rate})")
        return self


class PretrainConfig(Section):
    """CLIP-style pre-training with Ray Train (tasks/pretrain.py); defaults sized for 2 CPU cores."""

    PATHS = frozenset({"data_dir", "control_data_dir", "out_dir", "storage_dir"})
    # num_workers and use_gpu change results: the float rounding of the reductions (and other batches
    # under the shards split), bf16 autocast on GPUs
    OPERATIONAL = frozenset({"concurrent_runs", "threads_per_worker", "loader_workers", "cache_mb", "max_failures",
                             "checkpoint_every", "keep_checkpoints", "log_every"})
    RUNS = frozenset({"objectives", "controls", "weights", "defences", "defence_options"})

    data_dir: Path = Path("data/poisoned/train")  # the (poisoned) training shards
    control_data_dir: Path = Path("data/curated/train")  # the unpoisoned shards, for the controls
    out_dir: Path = Path("data/models/pretrain")  # <objective>/ and control-<objective>/ per run
    storage_dir: str = "data/staging/pretrain"  # Ray Train run storage (checkpoints, resume); shared path on a cluster
    objectives: Annotated[list[str], Field(min_length=1), _names(OBJECTIVES, "objective")] = ["mmcl", "mmcl_ssl"]
    # objectives also trained on the unpoisoned shards: the controls
    controls: Annotated[list[str], _names(OBJECTIVES, "objective")] = ["mmcl"]
    # per objective, over objectives.WEIGHTS, e.g. {mmcl_ssl: {ssl: 2}}
    weights: Annotated[dict[str, dict[str, Real]], _options(OBJECTIVES, "objective", "weights")] = {}
    # pre-training defences, each with every objective ("none": undefended); models <objective>+<defence>
    defences: Annotated[list[str], Field(min_length=1), _names(PRETRAINING_DEFENCES, "pre-training defence")] = ["none"]
    # per defence, over defences.PRETRAINING
    defence_options: Annotated[dict[str, dict[str, Real]], _options(PRETRAINING_DEFENCES, "pre-training defence")] = {}
    model: Annotated[str, Field(min_length=1)] = "rn-tiny"  # an open_clip model name or a config in models/
    epochs: Annotated[StrictInt, Field(ge=1)] = 8
    batch_size: Annotated[StrictInt, Field(ge=2)] = 64  # samples per optimiser step, over all workers and micro-batches
    # micro-batches per optimiser step: each worker encodes batch_size / (num_workers x accum_steps) samples
    # at a time, and the step's gradient is that of the whole batch (core.model.forward_backward)
    accum_steps: Annotated[StrictInt, Field(ge=1)] = 1
    lr: Annotated[Real, Field(gt=0)] = 1e-3
    warmup_steps: Annotated[StrictInt, Field(ge=0)] = 50
    weight_decay: Annotated[Real, Field(ge=0)] = 0.1
    beta1: Annotated[Real, Field(ge=0, lt=1)] | None = None  # None: 0.9
    beta2: Annotated[Real, Field(ge=0, lt=1)] | None = None  # None: 0.98 for ViTs, 0.999 for ResNets (open_clip)
    eps: Annotated[Real, Field(gt=0)] | None = None  # None: 1e-6 for ViTs, 1e-8 for ResNets
    grad_clip: Annotated[Real, Field(gt=0)] | None = None
    split: Literal["auto", "samples", "shards"] = "auto"  # how workers share the stream (core/data/loader.py)
    shuffle_buffer: Annotated[StrictInt, Field(ge=1)] = 1000
    checkpoint_every: Annotated[StrictInt, Field(ge=1)] = 100  # optimiser steps
    keep_checkpoints: Annotated[StrictInt, Field(ge=1)] = 2
    log_every: Annotated[StrictInt, Field(ge=1)] = 10
    num_workers: Annotated[StrictInt, Field(ge=1)] = 1  # Ray Train workers per run (processes; one per GPU on a cluster)
    concurrent_runs: Annotated[StrictInt, Field(ge=1)] = 2  # runs (models) training at once, each on its own workers
    use_gpu: Literal["auto", True, False] = "auto"
    threads_per_worker: Annotated[StrictInt, Field(ge=1)] | None = None  # None: cores / (workers x concurrent runs)
    # processes per Train worker that decode and augment its batches; 0: a thread of the worker.
    # The batches are the same bytes for any value (core/data/loader.py)
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 0
    # MiB per Train worker of shard samples and decoded images kept between epochs (core.data.loader.SampleCache)
    cache_mb: Annotated[Real, Field(ge=0)] = 1024
    compile: bool = False  # torch.compile the model (GPUs: faster steps after a warm-up; other rounding)
    max_failures: Annotated[StrictInt, Field(ge=0)] = 1  # worker restarts from the last checkpoint


    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % (self.num_workers * self.accum_steps):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by num_workers x accum_steps "
                             f"({self.num_workers} x {self.accum_steps})")
        return self


class CleanConfig(Section):
    """CleanCLIP-style cleaning sweeps (tasks/clean.py). The study's values are in params.yaml comments."""

    PATHS = frozenset({"data_dir", "eval_dir", "models_dir", "out_dir"})
    OPERATIONAL = frozenset({"runner", "threads_per_run", "loader_workers", "cache_mb", "eval_batch_size"})
    RUNS = frozenset({"models", "defences", "defence_options", "lrs"})
    MATRIX = frozenset({"models", "defences"})

    data_dir: Path = Path("data/poisoned/cleaning")
    eval_dir: Path = Path("data/poisoned/eval")
    models_dir: Path = Path("data/models/pretrain")
    out_dir: Path = Path("data/models/cleaned")  # <model>/<defence>/: sweep.json, best.pt, lr-*/epochs.json
    models: Annotated[list[str], Field(min_length=1)] = ["mmcl", "mmcl_ssl", "control-mmcl"]  # folders of models_dir
    defences: Annotated[list[str], Field(min_length=1), _names(DEFENCES, "defence")] = ["cleanclip"]
    # per defence, over defences.OPTIONS
    defence_options: Annotated[dict[str, dict[str, Real]], _options(DEFENCES, "defence")] = {}
    lrs: Annotated[list[Real], Field(min_length=1)] = [1e-3, 3e-3]
    epochs: Annotated[StrictInt, Field(ge=1)] = 4
    batch_size: Annotated[StrictInt, Field(ge=2)] = 64
    warmup_steps: Annotated[StrictInt, Field(ge=0)] = 10
    weight_decay: Annotated[Real, Field(ge=0)] = 0.1
    freeze_bn_stats: bool = True  # keep BatchNorm running statistics of the pretrained model
    eval_batch_size: Annotated[StrictInt, Field(ge=1)] = 256
    runner: RunnerConfig = RunnerConfig()  # the sweep's runs in parallel
    threads_per_run: Annotated[StrictInt, Field(ge=1)] | None = None  # None: the machine's cores / runner workers
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 0  # decoding processes per run (pretrain.loader_workers)
    cache_mb: Annotated[Real, Field(ge=0)] = 1024  # MiB per run: cleaning data and eval sets kept between epochs

    @model_validator(mode="after")
    def _check(self):
        bad = [lr for lr in self.lrs if not lr > 0]
        if bad:
            raise ValueError(f"lrs: learning rates must be positive, got {bad}")
        return self


class DetectConfig(Section):
    """Poisoned-pair detection (tasks/detect.py): every training pair scored under each poisoned model."""

    PATHS = frozenset({"data_dir", "manifest", "models_dir", "out_dir", "metrics_dir"})
    OPERATIONAL = frozenset({"batch_size", "use_gpu", "loader_workers", "cache_mb"})

    data_dir: Path = Path("data/poisoned/train")  # the training pairs to score
    manifest: Path = Path("data/poisoned/poison_manifest.parquet")  # the ground truth
    models_dir: Path = Path("data/models/pretrain")
    out_dir: Path = Path("data/detect")  # <model>/scores.parquet
    metrics_dir: Path = Path("data/metrics")  # detection.json
    models: list[str] | None = None  # folders of models_dir; None: every poisoned (non-control) model
    detectors: Annotated[list[str], Field(min_length=1), _names(DETECTORS, "detector")] = ["similarity", "density", "spectral"]
    # per detector, over detectors.OPTIONS
    detector_options: Annotated[dict[str, dict[str, Real]], _options(DETECTORS, "detector")] = {}
    batch_size: Annotated[StrictInt, Field(ge=1)] = 256
    use_gpu: Literal["auto", True, False] = "auto"
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 0
    cache_mb: Annotated[Real, Field(ge=0)] = 1024


class OptimiseTriggerConfig(Section):
    """The optimise-trigger stage (tasks/optimise_trigger.py): a patch optimised against a surrogate model, in the
    spirit of BadCLIP (Liang et al., CVPR 2024), for `poison.trigger.name: optimised`. The surrogate is
    pretrain's control of `surrogate` (the same recipe, seed `seed`) on the clean shards; the patch's side,
    placement and target are poison's."""

    PATHS = frozenset({"data_dir", "out_dir"})
    # what it reads of other sections (dvc.yaml's params; tests/test_layout.py checks): the trigger's geometry and
    # target, and the surrogate's recipe (every pretrain setting that changes a control run)
    READS: ClassVar[frozenset[str]] = frozenset({"poison.target", "poison.captions", "poison.trigger", "poison.eval_set"})

    data_dir: Path = Path("data/curated")  # train/: the attacker's clean pairs (surrogate, patch); eval/: the surrogate's ASR
    out_dir: Path = Path("data/trigger")  # patch.png, trigger.json (settings, loss per step, cost), surrogate/
    surrogate: Annotated[str, AfterValidator(lambda name: _known([name], OBJECTIVES, "objective")[0])] = "mmcl"
    images: Annotated[StrictInt, Field(ge=2)] = 2048  # training images not naming the target, the patch's ground
    steps: Annotated[StrictInt, Field(ge=1)] = 300
    batch_size: Annotated[StrictInt, Field(ge=1)] = 64
    lr: Annotated[Real, Field(gt=0)] = 0.01  # Adam on the patch's [0, 1] pixels
    margin: Annotated[Real, Field(ge=0)] = 0.1  # the triplet term's cosine margin
    image_weight: Annotated[Real, Field(ge=0)] = 1.0  # the triplet term (toward target images, away from the own) vs the text term

    @classmethod
    def reads(cls) -> set[str]:
        surrogate_recipe = PretrainConfig.dvc_params() - {"objectives", "controls", "defences", "defence_options"}
        return set(cls.READS) | {f"pretrain.{k}" for k in surrogate_recipe}


class EvaluateConfig(Section):
    PATHS = frozenset({"eval_dir", "models_dir", "cleaned_dir", "detection", "metrics_dir", "plots_dir", "report_dir"})
    OPERATIONAL = frozenset({"batch_size", "use_gpu", "loader_workers"})

    eval_dir: Path = Path("data/poisoned/eval")  # labelled/ and asr/ (triggered non-target images)
    models_dir: Path = Path("data/models/pretrain")  # every */model.pt is evaluated
    cleaned_dir: Path = Path("data/models/cleaned")  # <pretrained>/<defence>/sweep.json: the cleaned models
    detection: Path = Path("data/metrics/detection.json")  # the detect stage's metrics, in the report when present
    metrics_dir: Path = Path("data/metrics")  # DVC metrics
    plots_dir: Path = Path("data/plots")  # DVC plots (CSV)
    report_dir: Path = Path("reports")  # report.md and figures
    batch_size: Annotated[StrictInt, Field(ge=1)] = 256
    use_gpu: Literal["auto", True, False] = "auto"
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 0  # decoding processes (0: a thread); same metrics for any value


class ScheduleConfig(Strict):
    name: Annotated[str, Field(min_length=1)] = "study"  # the deployment's name
    cron: Annotated[str, Field(min_length=9)] = "0 3 * * 1"  # when `python -m flows.deploy` runs the pipeline


class StudyConfig(Strict):
    """The study as a grid (flows/study.py): one member per (axis values, data seed, training seed), each a
    pipeline run in a DVC project of its own under `dir`; statistics over the seeds (tasks/study.py)."""

    dir: Path = Path("data/study")  # members/<name>/ (workspaces), study.json, report.md and figures
    seeds: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] = [0, 1, 2]  # train_seed values
    data_seeds: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] = [0]  # seed values
    axes: dict[str, Annotated[list, Field(min_length=1)]] = {}  # params key -> values, e.g. {poison.count: [100, 1000]}
    concurrent: Annotated[StrictInt, Field(ge=1)] = 1  # members running a stage at once
    defence: Annotated[str, Field(min_length=1)] = "cleanclip"  # the cleaning the contrast is read from
    contrast: tuple[str, str] = ("mmcl_ssl", "mmcl")  # objectives a, b: the paired statistic is a - b
    accuracy_drop: Literal[0.01, 0.02, 0.03] = 0.03  # residual ASR: the lowest within this accuracy loss

    @field_validator("seeds", "data_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @field_validator("axes")
    @classmethod
    def _known_keys(cls, axes: dict) -> dict:
        for key in axes:
            section, _, field = key.partition(".")
            if key in ("seed", "train_seed"):
                raise ValueError(f"{key}: seeds are study.data_seeds (seed) and study.seeds (train_seed), not axes")
            if section == "study":
                raise ValueError(f"{key}: the study's own settings are not axes")
            annotation = Params.model_fields[section].annotation if section in Params.model_fields else None
            model = next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                          and issubclass(a, Section)), None)
            if model is None or field.split(".")[0] not in model.model_fields:
                raise ValueError(f"{key}: not a params key (section.field[.subfield], e.g. poison.count)")
            if field.split(".")[0] in model.PATHS:
                raise ValueError(f"{key}: a folder; each member has its own workspace")
        return axes


class Params(Strict):
    seed: Annotated[StrictInt, Field(ge=0)] = 0  # the data seed: corpus, poison choice and triggers, cleaning subset
    train_seed: Annotated[StrictInt, Field(ge=0)] | None = None  # init, data order, augmentations (pretrain, clean); null: seed
    curate: CurateConfig
    poison: PoisonConfig | None = None
    pretrain: PretrainConfig | None = None
    optimise_trigger: OptimiseTriggerConfig = OptimiseTriggerConfig()  # every field has a default (as detect)
    detect: DetectConfig = DetectConfig()  # every field has a default: params files of earlier versions run it
    clean: CleanConfig | None = None
    evaluate: EvaluateConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    study: StudyConfig = StudyConfig()

    @property
    def training_seed(self) -> int:
        """The seed of pretrain and clean: train_seed, else the one seed."""
        return self.seed if self.train_seed is None else self.train_seed


def section_of(stage: str) -> str:
    """The params section of a dvc.yaml stage (optimise-trigger: optimise_trigger)."""
    return stage.replace("-", "_")


def require_section(params: "Params", name: str, error: type[Exception] = ValueError):
    """A stage's section of params, or `error` saying it is missing."""
    section = getattr(params, name)
    if section is None:
        raise error(f"params has no `{name}` section")
    return section


# Keys of earlier versions: an old params file is told what became of them.
MOVED = {
    "pretrain.baselines": "renamed pretrain.controls (the unpoisoned reference models)",
    "pretrain.baseline_data_dir": "renamed pretrain.control_data_dir",
    "evaluate.sweeps_dir": "renamed evaluate.cleaned_dir",
    "clean.target": "removed: the target comes with the eval sets (eval/asr/attack.json, from poison.target)",
    "evaluate.target": "removed: the target comes with the eval sets (eval/asr/attack.json, from poison.target)",
    "curate.partition_size": "removed: partitions are curate.shard_maxcount samples",
}


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} invalid value(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        # a check across a section's fields gets the whole section as input: the message says what is wrong
        got = "" if e["type"] == "missing" or isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
        moved = f"; {MOVED[key]}" if e["type"] == "extra_forbidden" and key in MOVED else ""
        lines.append(f"  {key}: {e['msg']}{got}{moved}")
    return "\n".join(lines)


def parse_params(raw: dict, origin: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, str(path))


def dump_params(params: Params, path: str | Path) -> Path:
    """Write `params` in full, every key as params.yaml lists them (dvc.yaml reads folders and params by key,
    so DVC needs them all), atomically."""
    from core.data.shards import replacing

    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude_none=False), sort_keys=False))
    return path
