"""The objective interface, weighted sums, the distributed gather and the logit-scale clamp.

An objective is called as `loss, parts = obj(outputs)`. `outputs` holds L2-normalised
embeddings `image` and `text` ([B, D]), `logit_scale` (the learnable log of the scale), optionally
`logit_bias`, and the augmented views (`image_aug`, `text_aug`) that the objective lists in
`views`; `text_own`, when a defence pairs the images with other captions' embeddings in `text`, holds the
captions' own (for in-modal terms). `parts` maps names to detached float tensors for logging.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.distributed as dist
from open_clip.loss import gather_features

MAX_LOGIT_SCALE = 100.0


class Objective:
    name: str = ""
    views: frozenset[str] = frozenset()  # augmented views the objective needs

    def __call__(self, outputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = sorted(self.views - outputs.keys())
        if missing:
            raise KeyError(f"objective {self.name!r} needs views {sorted(self.views)}; outputs lack {missing} "
                           f"(have {sorted(outputs)})")
        return self.loss(outputs)

    def loss(self, outputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class WeightedSum(Objective):
    """sum_k w_k * objective_k; parts are the terms' own parts plus the weighted total `loss`."""

    def __init__(self, terms: dict[str, tuple[float, Objective]], name: str = ""):
        self.terms = terms
        self.name = name or "+".join(f"{w:g}*{k}" for k, (w, _) in terms.items())
        self.views = frozenset().union(*(obj.views for _, obj in terms.values()))

    def loss(self, outputs):
        total, parts = 0.0, {}
        for weight, obj in self.terms.values():
            if weight == 0:
                continue
            term, term_parts = obj(outputs)
            total = total + weight * term
            parts.update(term_parts)
        return total, parts | {"loss": total.detach()}


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_local = threading.local()


@contextlib.contextmanager
def pre_gathered():
    """Objectives called inside see outputs that are already the global batch (`gather_rows`): they gather
    nothing more. For losses on a subset of the global batch (SafeCLIP's safe and risky pairs)."""
    before, _local.gathered = getattr(_local, "gathered", False), True
    try:
        yield
    finally:
        _local.gathered = before


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The global batch of a local [B, ...] tensor in rank order, with gradient when it has one
    (torch.distributed.nn.all_gather, as open_clip's --gather-with-grad); itself on one process."""
    _, world_size = world()
    if world_size == 1:
        return t
    if t.requires_grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(t), dim=0)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def gather_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of two local [B, D] tensors, with gradient (open_clip --gather-with-grad).

    Every rank then computes the same global loss; with DDP's gradient averaging the parameter
    gradients equal those of one process on the concatenated batch. Inside `pre_gathered`, (a, b) as they are.
    """
    rank, world_size = world()
    if world_size == 1 or getattr(_local, "gathered", False):
        return a, b
    return gather_features(a, b, gather_with_grad=True, rank=rank, world_size=world_size)


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned a and b: 1/2 [CE(s a b^T, diag) + CE(s b a^T, diag)]."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit_scale) in [1, max_scale]; the trainer calls this after every optimiser step."""
    logit_scale.clamp_(0, math.log(max_scale))
