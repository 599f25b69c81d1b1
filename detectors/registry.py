"""Detector names (detectors/__init__.py) to their implementations: `get_detector(name, **options)`."""
from __future__ import annotations

from core.registry import build
from detectors import OPTIONS
from detectors.base import Detector
from detectors.density import Density
from detectors.similarity import Similarity
from detectors.spectral import Spectral

REGISTRY = {"similarity": Similarity, "density": Density, "spectral": Spectral}


def get_detector(name: str, **options: float) -> Detector:
    """The detector `name` with its default options (detectors.OPTIONS) updated by `options`.
    Raises KeyError for an unknown name, TypeError for an option it does not take, ValueError for a bad value."""
    return build("detector", REGISTRY, OPTIONS, name, options)
