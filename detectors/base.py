"""A detector: scores for every training pair from its image and caption embeddings."""
from __future__ import annotations

import numpy as np


class Detector:
    name: str = ""

    def score(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """Scores [N] (higher: more likely poisoned) of N pairs from their L2-normalised image and caption
        embeddings, each [N, D] float, under the model the detector inspects."""
        raise NotImplementedError
