"""Defence names (defences/__init__.py) to their implementations: `get_defence(name, **options)`."""
from __future__ import annotations

from defences import OPTIONS
from defences.base import Defence
from defences.finetune import cleanclip, mmcl, ssl
from defences.shrink_perturb import ShrinkPerturb

REGISTRY = {"cleanclip": cleanclip, "mmcl": mmcl, "ssl": ssl, "shrink_perturb": ShrinkPerturb}


def get_defence(name: str, **options: float) -> Defence:
    """The defence `name` with its default options (defences.OPTIONS) updated by `options`.
    Raises KeyError for an unknown name and TypeError for an option it does not take."""
    if name not in REGISTRY:
        raise KeyError(f"unknown defence {name!r}; known defences: {sorted(REGISTRY)}")
    defaults = OPTIONS.get(name, {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"defence {name!r} takes options {defaults or 'none'}; unknown: {unknown}")
    defence = REGISTRY[name](**(defaults | options))
    defence.name = name
    return defence
