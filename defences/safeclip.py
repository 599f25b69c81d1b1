"""SafeCLIP ("Better Safe than Sorry", Yang et al., ICML 2024, arXiv 2310.05862) during pre-training, with
any objective.

- Warm-up (the first `warmup` epochs): unimodal contrastive learning only (image vs its augmented view,
  caption vs its augmented view: objectives.ssl.SSL), so that the two towers learn each modality before
  any (possibly poisoned) pairing; then `crossmodal` epochs of the objective on every pair, so that the
  image-caption similarities mean something before the first split (the reference runs them at a low lr).
- Every later epoch starts with a split of the training set: the cosine similarity of every pair's image
  and caption embeddings under the current model; a two-component Gaussian mixture over them
  (sklearn.mixture.GaussianMixture); p_safe, each pair's posterior under the higher-mean component. The
  first split takes the pairs with p_safe >= `threshold` and sets the safe share s to their share; each
  later split takes the top s of pairs by p_safe, s growing by `growth` per epoch up to `max_share`.
- The safe pairs train under the objective (the CLIP loss in the paper); the risky pairs under the
  unimodal loss only, so a poisoned pair's image never meets its caption in a contrastive term.

Read from the paper and its public code (BigML-CS-UCLA/SafeCLIP), implemented here. Differences: both
parts are one step's loss (the sum of their means over the global batch's safe and risky pairs) rather than
two passes with their own learning rates, so the batches stay the loader's; the similarities are those of the
un-augmented views; no nearest-neighbour memory bank in the unimodal loss; the cross-modal warm-up runs at the
schedule's learning rate.
"""
from __future__ import annotations

import numpy as np
import torch

from core.model import EMBEDDINGS
from defences.base import PretrainingDefence
from objectives.base import Objective, gather_rows, pre_gathered
from objectives.ssl import SSL


def safe_posterior(similarity: np.ndarray, seed: int) -> np.ndarray:
    """p_safe [N]: each similarity's posterior under the higher-mean component of a two-component Gaussian
    mixture fitted to `similarity` [N] (sklearn, seeded: the same split on every worker and rerun)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(similarity, dtype=np.float64)[:, None]
    gmm = GaussianMixture(n_components=2, random_state=seed).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmax(gmm.means_[:, 0]))]


def split(keys: list[str], similarity: np.ndarray, share: float | None, threshold: float, seed: int) -> tuple[set, float]:
    """(the risky keys, the safe share taken): with no share yet, the pairs with p_safe >= threshold; else the
    top `share` of pairs by p_safe (ties by key order, so the split does not depend on the order of `keys`)."""
    p = safe_posterior(similarity, seed)
    order = np.argsort(np.array(keys))
    keys, p = [keys[i] for i in order], p[order]
    if share is None:
        safe = p >= threshold
    else:
        safe = np.zeros(len(keys), bool)
        safe[np.argsort(-p, kind="stable")[:round(share * len(keys))]] = True
    return {k for k, s in zip(keys, safe) if not s}, float(safe.mean())


class SafeCLIP(PretrainingDefence):
    """State: the next split's safe share, the epoch of the current split and its risky keys (None in the
    warm-up: every pair unimodal; empty in the cross-modal warm-up)."""

    views = SSL.views
    keyed = True

    def __init__(self, warmup: float, crossmodal: float, threshold: float, growth: float, max_share: float):
        if min(warmup, crossmodal) < 0 or warmup != int(warmup) or crossmodal != int(crossmodal) \
                or not 0 < threshold < 1 or growth < 0 or not 0 < max_share <= 1:
            raise ValueError(f"safeclip: warmup and crossmodal must be whole numbers >= 0, threshold in (0, 1), "
                             f"max_share in (0, 1], growth >= 0; got warmup={warmup}, crossmodal={crossmodal}, "
                             f"threshold={threshold}, growth={growth}, max_share={max_share}")
        self.warmup, self.crossmodal = int(warmup), int(crossmodal)
        self.threshold, self.growth, self.max_share = threshold, growth, max_share
        self.share: float | None = None  # the next split's safe share
        self.risky: set[str] | None = None  # None: the warm-up (every pair unimodal)
        self.split_epoch, self.taken, self.mask = -1, None, None

    def idle(self, epochs):
        if epochs <= self.warmup + self.crossmodal:
            return (f"safeclip splits after its {self.warmup} + {self.crossmodal} warm-up epochs "
                    f"(safeclip.warmup, safeclip.crossmodal)")
        return None

    def begin_epoch(self, epoch, similarities, seed):
        if epoch < self.warmup:
            self.risky = None
            return {"safeclip": "warm-up"}
        if epoch < self.warmup + self.crossmodal:
            self.risky = set()
            return {"safeclip": "cross-modal warm-up"}
        if self.split_epoch != epoch:  # a run resumed inside an epoch keeps that epoch's split (checkpointed)
            pairs = similarities()
            self.risky, self.taken = split(pairs["keys"], pairs["similarity"], self.share, self.threshold, seed + epoch)
            self.share, self.split_epoch = min(self.taken + self.growth, self.max_share), epoch
        return {"safeclip": "split", "safe_share": self.taken}

    def begin_step(self, keys):
        self.mask = None if self.risky is None else torch.tensor([k in self.risky for k in keys])

    def wrap(self, objective):
        return Split(objective, self)

    def state_dict(self):
        return {"share": self.share, "split_epoch": self.split_epoch, "taken": self.taken,
                "risky": None if self.risky is None else sorted(self.risky)}

    def load_state_dict(self, state):
        self.share, self.split_epoch, self.taken = state.get("share"), state.get("split_epoch", -1), state.get("taken")
        self.risky = None if state.get("risky") is None else set(state["risky"])


class Split(Objective):
    """The objective on the global batch's safe pairs plus the unimodal loss on its risky ones (all of them
    in the warm-up)."""

    def __init__(self, objective: Objective, defence: SafeCLIP):
        self.inner, self.defence, self.unimodal = objective, defence, SSL()
        self.name, self.views = objective.name, objective.views | SSL.views

    def loss(self, outputs):
        # every parameter stays in the graph whichever part is empty (the logit bias, say, which SSL does not use):
        # DDP waits for a gradient of each
        anchor = sum(0 * v.sum() for k, v in outputs.items() if torch.is_tensor(v) and v.requires_grad)
        if self.defence.mask is None:
            loss, parts = self.unimodal(outputs)
            return loss + anchor, parts
        rows = {k: gather_rows(v) for k, v in outputs.items() if k in EMBEDDINGS}
        risky = self.defence.mask.to(rows["image"].device)
        if len(risky) != len(rows["image"]):
            raise RuntimeError(f"safeclip: {len(risky)} keys for a global batch of {len(rows['image'])} rows")
        total, parts = anchor, {}
        with pre_gathered():
            for which, objective in ((~risky, self.inner), (risky, self.unimodal)):
                if which.sum() >= 2:  # a contrastive loss needs a negative
                    loss, more = objective(outputs | {k: v[which] for k, v in rows.items()})
                    total, parts = total + loss, parts | more
        n = torch.tensor(float(risky.sum()), device=total.device)
        return total, parts | {"safeclip_risky": n}
