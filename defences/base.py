"""The two kinds of defence.

A cleaning defence (`Defence`, the clean stage): how to prepare a poisoned model, the encoder that
computes what its loss needs, and the objective to fine-tune it with.

A pre-training defence (`PretrainingDefence`, the pretrain stage, with any objective): it changes what
the objective sees (`outputs`) and may look at the whole training set between epochs (`begin_epoch`).
The loader is untouched, so the batches stay those of the undefended run: same bytes for any number of
workers or loader processes; the defence's state is the same on every worker (it only uses global,
gathered values) and travels in the checkpoint (`state_dict`), so a resumed run continues it.
"""
from __future__ import annotations

from typing import Callable

import torch

from core.model import DualEncoder
from objectives.base import Objective
from objectives.registry import get_objective


class Defence:
    name: str = ""

    def __init__(self, objective: str, **weights: float):
        self.objective_name, self.weights = objective, weights

    def objective(self) -> Objective:
        return get_objective(self.objective_name, **self.weights)

    def prepare(self, model: torch.nn.Module, fresh: torch.nn.Module) -> None:
        """Change the model in place before fine-tuning; `fresh` is a newly initialised twin."""

    def encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose outputs the objective reads (core.model.DualEncoder's, by default)."""
        return DualEncoder(model)


# () -> {"keys": N strings, "similarity": [N] image-caption cosines}: every training pair under the model now
Similarities = Callable[[], dict]


class PretrainingDefence:
    """No defence: the objective as it is. Subclasses override what they change."""

    name: str = "none"
    views: frozenset[str] = frozenset()  # loader views it needs besides the objective's
    keyed: bool = False  # whether `begin_step` needs the step's keys (gathering them costs a collective a step)

    def idle(self, epochs: int) -> str | None:
        """Why the defence would never act in a run of `epochs` epochs (None: it acts)."""
        return None

    def begin_epoch(self, epoch: int, similarities: Similarities, seed: int) -> dict:
        """Before epoch `epoch` (0-based): look at the training set if needed (`similarities()`, every pair's, the
        same on every worker); returns what to log. Rank 0's state is then every worker's."""
        return {}

    def wrap(self, objective: Objective) -> Objective:
        """The objective as this defence trains with it in the current epoch."""
        return objective

    def begin_step(self, keys: list[str] | None) -> None:
        """Before each optimiser step; `keys` (when `keyed`): the step's global batch in row order (rank by
        rank, each rank's micro-batches in turn), as the objective's gathered rows."""

    def end_step(self) -> None:
        """After each optimiser step."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue as the uninterrupted one (saved in each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output ({} from a checkpoint of an undefended run)."""
