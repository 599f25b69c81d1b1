"""Registry of cleaning defences: `get_defence(name, **options)`.

A new defence is one module (a `Defence`: an objective and an optional `prepare` of the model)
and one line below.
"""
from __future__ import annotations

import inspect

from defences.base import Defence
from defences.finetune import cleanclip, mmcl, ssl
from defences.shrink_perturb import ShrinkPerturb

REGISTRY = {"cleanclip": cleanclip, "mmcl": mmcl, "ssl": ssl, "shrink_perturb": ShrinkPerturb}


def defence_options(name: str) -> dict:
    return {k: p.default for k, p in inspect.signature(REGISTRY[name]).parameters.items()}


def get_defence(name: str, **options) -> Defence:
    if name not in REGISTRY:
        raise KeyError(f"unknown defence {name!r}; known defences: {sorted(REGISTRY)}")
    unknown = sorted(set(options) - set(defence_options(name)))
    if unknown:
        raise TypeError(f"defence {name!r} takes options {defence_options(name) or 'none'}; unknown: {unknown}")
    defence = REGISTRY[name](**options)
    defence.name = name
    return defence


__all__ = ["REGISTRY", "Defence", "defence_options", "get_defence"]
