"""A cleaning defence: how to prepare a poisoned model, and which objective to fine-tune it with."""
from __future__ import annotations

import torch

from objectives.registry import get_objective
from objectives.base import Objective


class Defence:
    name: str = ""

    def __init__(self, objective: str, **weights: float):
        self.objective_name, self.weights = objective, weights

    def objective(self) -> Objective:
        return get_objective(self.objective_name, **self.weights)

    def prepare(self, model: torch.nn.Module, fresh: torch.nn.Module) -> None:
        """Change the model in place before fine-tuning; `fresh` is a newly initialised twin."""
