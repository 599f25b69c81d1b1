"""Defence names (defences/__init__.py) to their implementations: `get_defence(name, **options)`."""
from __future__ import annotations

from core.registry import build
from defences import OPTIONS, PRETRAINING
from defences.base import Defence, PretrainingDefence
from defences.finetune import cleanclip, mmcl, ssl
from defences.par import PerturbAndRecover
from defences.roclip import RoCLIP
from defences.safeclip import SafeCLIP
from defences.shrink_perturb import ShrinkPerturb

REGISTRY = {"cleanclip": cleanclip, "mmcl": mmcl, "ssl": ssl, "shrink_perturb": ShrinkPerturb, "par": PerturbAndRecover}
PRETRAINING_REGISTRY = {"none": PretrainingDefence, "roclip": RoCLIP, "safeclip": SafeCLIP}


def get_defence(name: str, **options: float) -> Defence:
    """The defence `name` with its default options (defences.OPTIONS) updated by `options`.
    Raises KeyError for an unknown name and TypeError for an option it does not take."""
    return build("defence", REGISTRY, OPTIONS, name, options)


def get_pretraining_defence(name: str, **options: float) -> PretrainingDefence:
    """The pre-training defence `name` ("none": none) with its default options (defences.PRETRAINING) updated
    by `options`. Raises KeyError for an unknown name, TypeError for an unknown option, ValueError for a bad value."""
    return build("pre-training defence", PRETRAINING_REGISTRY, PRETRAINING, name, options)
