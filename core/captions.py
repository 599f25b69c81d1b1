"""Captions that name a class, and the captions poisons are given (the poison stage, the optimised trigger)."""
from __future__ import annotations

import re


def names_regex(name: str) -> str:
    """A regex matching a caption that names `name` (or its plural), case-insensitively."""
    return rf"(?i)\b{re.escape(name)}s?\b"


def names_class(caption: str, name: str) -> bool:
    return re.search(names_regex(name), caption) is not None


def poison_captions(mode: str, target: str, train_captions: list[str]) -> list[str]:
    """The captions poisons draw from: "templates", open_clip's 80 ImageNet prompts naming the target; "corpus",
    the training captions that name it (sorted, unique). Raises ValueError when no training caption names it."""
    if mode == "templates":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # open_clip imports torch: ~4 s

        return [t("{}").format(target) for t in OPENAI_IMAGENET_TEMPLATES]
    naming = sorted(set(c for c in train_captions if names_class(c, target)))
    if not naming:
        raise ValueError(f"no training caption names the target {target!r}")
    return naming
