"""Objective names (objectives/__init__.py) to their implementations: `get_objective(name, **weights)`."""
from __future__ import annotations

from objectives import WEIGHTS
from objectives.base import Objective
from objectives.cyclip import CyCLIP
from objectives.mmcl import MMCL
from objectives.mmcl_ssl import mmcl_ssl
from objectives.mw_auc import MannWhitneyAUC
from objectives.siglip import SigLIP
from objectives.ssl import SSL

REGISTRY = {"mmcl": MMCL, "ssl": SSL, "mmcl_ssl": mmcl_ssl, "siglip": SigLIP, "cyclip": CyCLIP, "mw_auc": MannWhitneyAUC}


def get_objective(name: str, **weights: float) -> Objective:
    """The objective `name` with its default weights (objectives.WEIGHTS) updated by `weights`.
    Raises KeyError for an unknown name and TypeError for a weight it does not take."""
    if name not in REGISTRY:
        raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(REGISTRY)}")
    defaults = WEIGHTS.get(name, {})
    unknown = sorted(set(weights) - set(defaults))
    if unknown:
        raise TypeError(f"objective {name!r} takes weights {defaults or 'none'}; unknown: {unknown}")
    obj = REGISTRY[name](**(defaults | weights))
    obj.name = name
    return obj
