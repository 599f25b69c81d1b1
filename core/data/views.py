"""Augmented views for in-modal objectives (SSL, MMCL+SSL), deterministic per sample seed.

- Image: torchvision AutoAugment (ImageNet policy, the study's choice), then the base transform.
- Text: EDA (Wei & Zou, 2019) as CleanCLIP uses it: one of synonym replacement, random insertion,
  random swap (each at alpha 0.1) and random deletion (p 0.1), chosen per sample. Synonyms come from
  WordNet when nltk and its corpus are installed, else from a table shipped in core/data/synonyms.json.
  Each caption's view is computed once per sample and cached.
"""
from __future__ import annotations

import json
import logging
import random
from functools import lru_cache
from pathlib import Path

import torch
from torchvision.transforms import v2

log = logging.getLogger(__name__)
SYNONYM_TABLE = Path(__file__).with_name("synonyms.json")
STOP_WORDS = frozenset("a an the of on in at to and or is are this that my with for it its".split())


def image_view(image, seed: int, base_transform=None, policy=v2.AutoAugmentPolicy.IMAGENET):
    """AutoAugment of a PIL image or uint8 tensor, seeded; then `base_transform` if given."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that also reseeds the GPUs' generators
        out = _autoaugment(policy)(image)
    return base_transform(out) if base_transform is not None else out


@lru_cache(maxsize=None)
def _autoaugment(policy):
    return v2.AutoAugment(policy)


@lru_cache(maxsize=1)
def synonym_source():
    """(name, lookup): WordNet when available, else the shipped table; the choice is logged once."""
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")  # raises LookupError when the corpus is not installed

        def lookup(word: str) -> list[str]:
            names = {l.name().replace("_", " ") for s in wordnet.synsets(word) for l in s.lemmas()}
            return sorted(n for n in names if n.lower() != word)

        log.info("EDA synonyms: WordNet (nltk)")
        return "wordnet", lookup
    except (ImportError, LookupError):
        table = json.loads(SYNONYM_TABLE.read_text())
        log.info("EDA synonyms: WordNet not installed, using the shipped table %s (%d words)", SYNONYM_TABLE, len(table))
        return "table", lambda word: table.get(word, [])


def _synonym_replacement(words, n, rng, lookup):
    out = list(words)
    candidates = [i for i, w in enumerate(words) if w not in STOP_WORDS and lookup(w)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        out[i] = rng.choice(lookup(words[i]))
    return out


def _random_insertion(words, n, rng, lookup):
    out = list(words)
    for _ in range(n):
        options = [s for w in out if w not in STOP_WORDS for s in lookup(w)]
        if not options:
            break
        out.insert(rng.randrange(len(out) + 1), rng.choice(options))
    return out


def _random_swap(words, n, rng, lookup):
    out = list(words)
    for _ in range(n if len(out) > 1 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words, p, rng, lookup):
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


def eda(caption: str, seed: int, alpha_sr=0.1, alpha_ri=0.1, alpha_rs=0.1, p_rd=0.1) -> str:
    """One EDA view of a caption; a pure function of (caption, seed, parameters, synonym source)."""
    words = caption.lower().split()
    if not words:
        return caption
    rng = random.Random(f"{seed}:{caption}")
    _, lookup = synonym_source()
    n = lambda alpha: max(1, int(alpha * len(words)))  # noqa: E731
    op = rng.randrange(4)
    if op == 0:
        out = _synonym_replacement(words, n(alpha_sr), rng, lookup)
    elif op == 1:
        out = _random_insertion(words, n(alpha_ri), rng, lookup)
    elif op == 2:
        out = _random_swap(words, n(alpha_rs), rng, lookup)
    else:
        out = _random_deletion(words, p_rd, rng, lookup)
    return " ".join(out)


class TextViews:
    """EDA views cached by sample key: computed once per sample, as the study precomputes them."""

    def __init__(self, seed: int, **eda_params):
        self.seed, self.eda_params = seed, eda_params
        self._cache: dict[str, str] = {}

    def __call__(self, key: str, caption: str) -> str:
        if key not in self._cache:
            self._cache[key] = eda(caption, self.seed, **self.eda_params)
        return self._cache[key]
