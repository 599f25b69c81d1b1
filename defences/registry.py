"""Defence names (defences/__init__.py) to their implementations: `get_defence(name, **options)`."""
from __future__ import annotations

from core.registry import build
from defences import OPTIONS
from defences.base import Defence
from defences.finetune import cleanclip, mmcl, ssl
from defences.shrink_perturb import ShrinkPerturb

REGISTRY = {"cleanclip": cleanclip, "mmcl": mmcl, "ssl": ssl, "shrink_perturb": ShrinkPerturb}


def get_defence(name: str, **options: float) -> Defence:
    """The defence `name` with its default options (defences.OPTIONS) updated by `options`.
    Raises KeyError for an unknown name and TypeError for an option it does not take."""
    return build("defence", REGISTRY, OPTIONS, name, options)
