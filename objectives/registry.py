"""Objective names (objectives/__init__.py) to their implementations: `get_objective(name, **weights)`."""
from __future__ import annotations

from core.registry import build
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
    return build("objective", REGISTRY, WEIGHTS, name, weights, called="weights")
