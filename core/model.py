"""Models and their training step: build an open_clip model from scratch, AdamW with open_clip's
weight-decay groups, the warm-up + cosine schedule, one optimiser step's gradients (with gradient
accumulation), and the checks on weights. Shared by pre-training and cleaning."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch

from core.errors import InputError
from objectives.base import clamp_logit_scale

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # our open_clip configs (rn-tiny, vit-tiny)


class _FromScratchNotice(logging.Filter):
    """open_clip warns on every model built without pretrained weights: here that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_FromScratchNotice())


def register_models() -> None:
    import open_clip

    open_clip.add_model_config(MODELS_DIR)


def model_config(name: str, key: str = "model") -> dict:
    """open_clip's config of model `name` (ours in models/ first); InputError naming the params `key` if unknown."""
    import open_clip

    register_models()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise InputError(f"{key}: open_clip knows no model {name!r}; configs in {MODELS_DIR}: "
                         f"{sorted(p.stem for p in MODELS_DIR.glob('*.json'))}; built in: e.g. RN50, ViT-B-32")
    return cfg


def is_vit(cfg: dict) -> bool:
    return not isinstance(cfg["vision_cfg"].get("layers"), (list, tuple))


def build_model(name: str, objective: str):
    """(model, preprocess, tokenizer) from scratch; SigLIP gets open_clip's scale and bias init."""
    import open_clip

    register_models()
    extra = {}
    if objective == "siglip":
        from objectives.siglip import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE

        extra = {"init_logit_scale": INIT_LOGIT_SCALE, "init_logit_bias": INIT_LOGIT_BIAS}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **extra)
    return model, preprocess, open_clip.get_tokenizer(name)


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch's tensors on `device`, without its `keys`; images [B, 3, H, W] channels_last, the
    layout cuDNN's and oneDNN's convolutions run fastest in (the model is converted by `for_device`;
    same tensors, convolutions round differently). On GPUs the copies are asynchronous (the loader
    pins its batches)."""
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if k != "keys":
            v = v.to(device, non_blocking=cuda)
            out[k] = v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
    return out


def for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device` with channels_last weights (see `to_device`): measured on one core, rn-tiny's
    32 px steps take 15% (MMCL) to 22% (MMCL+SSL) less time than in the default layout."""
    return model.to(device).to(memory_format=torch.channels_last)


def encode_text(model, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text embeddings [B, D] of tokens `text` [B, L] (normalised by default, unlike open_clip's): open_clip's
    `CLIP.encode_text` run on the first n positions, n = the batch's last end-of-text position + 1 (dynamic
    padding). The same embeddings and gradients up to rounding (tested): open_clip's text tower is causal
    and pools the end-of-text token (the largest id, hence argmax), so no position after it reaches the
    output. The generated corpus' captions are <= 15 tokens of rn-tiny's 32 (CC3M's mostly under 20 of
    RN50's 77): the text tower does a half to a quarter of the work. Reading n waits for the tokens on a
    GPU (one sync a step). Other text towers (custom or Hugging Face ones, no causal mask, other pooling,
    a class token) and code under torch.compile (which would recompile per n) run open_clip's own
    `encode_text` on the whole context."""
    import open_clip

    if (type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or model.attn_mask is None
            or model.positional_embedding.shape[0] != text.shape[1] or torch.compiler.is_compiling()):
        return model.encode_text(text, normalize=normalize)
    n = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = open_clip.transformer.text_global_pool(x, text, "argmax")
    if isinstance(model.text_projection, torch.nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


class DualEncoder(torch.nn.Module):
    """One forward for every view an objective needs, so DDP sees a single forward per step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        m = self.model
        out = {"image": m.encode_image(batch["image"], normalize=True),
               "logit_scale": m.logit_scale, "logit_bias": getattr(m, "logit_bias", None)}
        if "image_aug" in batch:
            out["image_aug"] = m.encode_image(batch["image_aug"], normalize=True)
        if "text_aug" in batch:  # one pass for both (exact: the text tower has no batch statistics; one
            # embedding gradient to build, not two: 20% of an MMCL+SSL step at 32 px)
            out["text"], out["text_aug"] = encode_text(m, torch.cat([batch["text"], batch["text_aug"]])).chunk(2)
        else:
            out["text"] = encode_text(m, batch["text"])
        return out


# The kernels' choices that change a run's float rounding (fused AdamW, channels_last, the text tower run to the
# last end-of-text token): run identities name them, so a run made under other choices is not resumed with these.
NUMERICS = "adamw-fused, channels_last, trimmed-text"


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, vit: bool,
                   beta1: float | None = None, beta2: float | None = None, eps: float | None = None) -> torch.optim.AdamW:
    """AdamW as open_clip: weight decay on weight matrices only; tensors of at most one dimension (norms,
    biases, gains, the logit scale) get none (open_clip's `param.ndim <= 1` rule, not name substrings);
    betas and eps default to open_clip's for ViTs (0.9/0.98, 1e-6) and ResNets (0.9/0.999, 1e-8).
    torch's fused kernel (CPU and CUDA): one pass over the parameters, 6x faster than the default foreach on
    rn-tiny's 8M parameters (52 -> 9 ms a step on one core, 20% of a 32 px MMCL step), the same update up to
    rounding. Run identities name it (NUMERICS), so runs made with another implementation are not resumed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    betas = (beta1 or 0.9, beta2 or (0.98 if vit else 0.999))
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
                             lr=lr, betas=betas, eps=eps or (1e-6 if vit else 1e-8), fused=True)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


def optimizer_step(model, optimizer, scheduler, grad_clip: float | None = None) -> None:
    """Clip (optional), step the optimiser and the schedule, clear gradients, clamp the logit scale."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(model.logit_scale)


def non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers (BatchNorm statistics) holding NaN or inf."""
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


class RunStopped(InputError):
    """A run stopped by what it was given, not by a fault a retry could fix: its loss or weights
    became non-finite (the learning rate or data), or a shard turned out damaged. Never retried."""


# outputs with one row per sample: DualEncoder's, the captions' own under a re-pairing defence (RoCLIP), the
# frozen model's (PAR)
EMBEDDINGS = ("image", "text", "image_aug", "text_aug", "text_own", "frozen_image", "frozen_text")


def forward_backward(model: torch.nn.Module, objective, micro_batches: list[dict],
                     autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict]:
    """Gradients of one optimiser step on the batch made of `micro_batches` (dicts of tensors, each
    `image` (B_j, 3, H, W) px, `text` (B_j, 77) tokens and the views); returns the (detached) loss
    and its named parts. `model` is a DualEncoder (or DDP around one).

    One micro-batch: forward and backward. Several (gradient accumulation, open_clip's
    `--accum-freq`): the embeddings of every micro-batch are first computed without gradients; then
    each micro-batch is encoded again with gradients and the objective sees it beside the others'
    cached embeddings. Each backward is then the whole batch's loss (every negative); through the
    embeddings the backwards add up to one pass's gradient, and the logit scale and bias take a 1/N
    share from each. Exact for models without BatchNorm (a ResNet's BatchNorm normalises each
    micro-batch by its own statistics; its running statistics are kept from counting samples twice).
    Costs one extra forward pass without gradients per step; under DDP the gradients are all-reduced
    once per step."""
    if len(micro_batches) == 1:
        with autocast():
            loss, parts = objective(model(micro_batches[0]))
        loss.backward()
        return loss.detach(), parts
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    with torch.no_grad(), autocast():
        cached = [model(mb) for mb in micro_batches]
    for m, state in zip(norms, saved):  # BatchNorm's running statistics count each sample once
        m.load_state_dict(state)
    share, last = 1 / len(micro_batches), len(micro_batches) - 1
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP: all-reduce once, after the last backward
    for j, mb in enumerate(micro_batches):
        with no_sync() if j < last else contextlib.nullcontext():
            with autocast():
                out = model(mb)
                joined = {k: _share_grad(v, share) if k not in EMBEDDINGS else
                          torch.cat([v if i == j else c[k] for i, c in enumerate(cached)]) for k, v in out.items()}
                loss, parts = objective(joined)
            loss.backward()
    return loss.detach(), parts


def _share_grad(t: torch.Tensor | None, share: float) -> torch.Tensor | None:
    """`t` (the logit scale or bias, used whole by every micro-step) with `share` of its gradient, so
    that the micro-steps together give it one pass's gradient (open_clip's --accum-freq gives it
    accum-freq times)."""
    if t is None or not t.requires_grad:
        return t
    view = t.view_as(t)
    view.register_hook(lambda g: g * share)
    return view
