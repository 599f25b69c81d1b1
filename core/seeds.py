"""Seeds derived from the one seed in params, so results do not depend on order or workers."""
from __future__ import annotations

import hashlib


def sample_seed(seed: int, key: str, purpose: str) -> int:
    """A stable 63-bit seed for one sample and one purpose, independent of order and workers."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{key}".encode()).digest()[:8], "little") >> 1
