"""Image-caption similarity (SafeCLIP, Yang et al., ICML 2024, arXiv 2310.05862): a poisoned pair's
caption does not describe its image, so the pair's cosine similarity is low when the model has not (yet)
learnt the trigger's association. Score: minus the cosine similarity. Under a model that did learn it the
signal can turn (poisons fit their captions well): an AUROC below 0.5 says so."""
import numpy as np

from detectors.base import Detector


class Similarity(Detector):
    def score(self, image, text):
        """Minus the cosine similarity [N] of each pair's normalised image and caption embeddings [N, D]."""
        return -np.einsum("nd,nd->n", image, text)
