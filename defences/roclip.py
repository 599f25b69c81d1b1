"""RoCLIP (Yang et al., NeurIPS 2023, arXiv 2303.06854) during pre-training, with any objective.

A pool holds the text embeddings of the latest `pool` captions the model has seen (a FIFO of the global
batches, detached). Every `every`-th epoch (epochs 2, 4, ... counting from 1, as the reference code) each
image is paired with the pool caption nearest to the image's own embedding instead of its caption, and the
objective is computed with those matched embeddings as the captions (in-modal terms such as MMCL+SSL's keep
the captions' own, `text_own`); in the other epochs it trains as it is.
A poisoned image thus rarely meets its target caption: the pool's captions are mostly clean.

Read from the paper and its public code (BigML-CS-UCLA/RoCLIP), implemented here. Differences: the pool is
filled from the first step (the reference fills it only in matching epochs, from random vectors), so the
first matching epoch matches real captions; augmentation is the objective's own (its views).
"""
from __future__ import annotations

import torch

from defences.base import PretrainingDefence
from objectives.base import Objective, gather_rows


class RoCLIP(PretrainingDefence):
    """State: the pool ([P, D] text embeddings, newest last) and whether this epoch matches."""

    def __init__(self, pool: float, every: float):
        if pool < 1 or every < 1 or pool != int(pool) or every != int(every):
            raise ValueError(f"roclip: pool and every must be whole numbers >= 1, got pool={pool}, every={every}")
        self.size, self.every = int(pool), int(every)
        self.pool: torch.Tensor | None = None  # [P, D], newest rows last
        self.matching, self.last = False, None

    def idle(self, epochs):
        return None if epochs >= self.every else f"roclip matches in every {self.every}th epoch only (roclip.every)"

    def begin_epoch(self, epoch, similarities, seed):
        self.matching = (epoch + 1) % self.every == 0
        return {"roclip_matching": self.matching}

    def wrap(self, objective):
        return Matched(objective, self)

    def end_step(self):
        if self.last is None:
            return
        text = gather_rows(self.last)  # the global batch: every worker's pool is the same
        self.pool = text if self.pool is None else torch.cat([self.pool.to(text.device), text])[-self.size:]
        self.last = None

    def state_dict(self):
        return {"pool": None if self.pool is None else self.pool.cpu()}

    def load_state_dict(self, state):
        self.pool = state.get("pool")


def nearest(image: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The pool row nearest (cosine) to each image embedding: [B, D] of `pool` [P, D] for `image` [B, D]."""
    return pool[(image @ pool.T).argmax(dim=1)]


class Matched(Objective):
    """`objective` on outputs whose captions are the pool's nearest to each image (in matching epochs)."""

    def __init__(self, objective: Objective, defence: RoCLIP):
        self.inner, self.defence = objective, defence
        self.name, self.views = objective.name, objective.views

    def loss(self, outputs):
        text = outputs["text"]
        self.defence.last = text.detach()  # with gradient accumulation, the last call holds every local row
        pool = self.defence.pool
        if not self.defence.matching or pool is None:
            return self.inner(outputs)
        matched = nearest(outputs["image"].detach(), pool.to(text.device, text.dtype))
        # the pool is detached: the text tower gets no gradient from these pairs; 0 * text keeps it in the
        # graph, so DDP does not wait for gradients that never come
        loss, parts = self.inner(outputs | {"text": matched + 0 * text, "text_own": text})
        return loss, parts | {"roclip_matched": torch.ones((), device=text.device)}
