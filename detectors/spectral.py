"""Spectral signatures (Tran, Li and Madry, NeurIPS 2018) on the image embeddings: poisons share a
direction of variance that clean images lack, so after centering, the squared projection on the top
singular direction(s) of the embedding matrix is large for them. CLIP data has no class labels to
split by, so the whole set is centred once (as the CLIP detection papers apply it)."""
import numpy as np

from detectors.base import Detector


class Spectral(Detector):
    def __init__(self, components: float):
        if components < 1 or components != int(components):
            raise ValueError(f"spectral: components must be a whole number >= 1, got {components}")
        self.components = int(components)

    def score(self, image, text):
        """Squared projections [N] of the centred image embeddings [N, D] on their top `components` singular
        directions (the captions are not used)."""
        centred = image - image.mean(axis=0, keepdims=True)
        # right singular vectors of the [N, D] matrix: the directions of largest variance
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        return np.square(centred @ vt[:self.components].T).sum(axis=1)
