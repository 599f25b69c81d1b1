"""Registry of pre-training and cleaning objectives: `get_objective(name, **weights)`.

Adding an objective: one module with an `Objective` subclass (or a factory) and one line below.
"""
from __future__ import annotations

import inspect

from objectives.base import MAX_LOGIT_SCALE, Objective, WeightedSum, clamp_logit_scale
from objectives.cyclip import CyCLIP
from objectives.mmcl import MMCL
from objectives.mmcl_ssl import mmcl_ssl
from objectives.mw_auc import MannWhitneyAUC
from objectives.siglip import SigLIP
from objectives.ssl import SSL

REGISTRY = {
    "mmcl": MMCL,
    "ssl": SSL,
    "mmcl_ssl": mmcl_ssl,
    "siglip": SigLIP,
    "cyclip": CyCLIP,
    "mw_auc": MannWhitneyAUC,
}


def objective_options(name: str) -> dict[str, float]:
    """The weights an objective accepts, with their defaults."""
    return {k: p.default for k, p in inspect.signature(REGISTRY[name]).parameters.items()}


def get_objective(name: str, **weights: float) -> Objective:
    if name not in REGISTRY:
        raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(REGISTRY)}")
    options = objective_options(name)
    unknown = sorted(set(weights) - set(options))
    if unknown:
        raise TypeError(f"objective {name!r} takes weights {options or 'none'}; unknown: {unknown}")
    obj = REGISTRY[name](**weights)
    obj.name = name
    return obj


__all__ = ["REGISTRY", "MAX_LOGIT_SCALE", "Objective", "WeightedSum", "clamp_logit_scale", "get_objective",
           "objective_options"]
