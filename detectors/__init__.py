"""Poisoned-pair detectors: their names and the options each takes, with defaults.

Plain data like objectives/__init__.py (params validation reads it without torch); `detectors.registry`
builds them: `get_detector(name, **options)`. A detector scores every training pair from the poisoned
model's embeddings; a higher score means more likely poisoned. A new detector is one module (a `Detector`),
one line here and one in registry.py.
"""
OPTIONS: dict[str, dict[str, float]] = {
    "similarity": {},  # SafeCLIP's signal: a low image-caption cosine similarity
    "density": {"k": 16, "reference": 4096},  # Huang et al. (ICLR 2025): DAO, k neighbours in chunks of 4,096-8,191
    "spectral": {"components": 1},  # Tran et al. (2018): the projection on the top singular direction(s)
}
