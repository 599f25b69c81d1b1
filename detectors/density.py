"""Local neighbourhood density (Huang et al., ICLR 2025, "Detecting Backdoor Samples in Contrastive Language
Image Pretraining"): in a backdoored model's image embedding space the poisons' neighbourhoods are sparser
than clean pairs'. The score is the dimensionality-aware outlier score (DAO) they recommend:

    LID(y) = -k / sum_{m=1..k} log(d_m(y) / d_k(y))            (maximum-likelihood local intrinsic dimension)
    DAO(x) = mean_{y in N_k(x)} (d_k(x) / d_k(y)) ^ LID(y)      (Anderberg et al., 2024)

d_m(x): the distance from x to its m-th nearest neighbour (itself excluded), N_k(x) its k nearest
neighbours, among a reference set: consecutive chunks of `reference` to 2 x `reference` - 1 pairs in shard order
(the paper uses the batch), which bounds the cost at N x 2 x reference distances. The score is computed as
log DAO (a log-sum-exp, the same ranking without overflow). Neighbours come from
sklearn.neighbors.NearestNeighbors (Euclidean on the normalised embeddings: the cosine order).
Read from the paper and its public code (HanxunH/Detect-CLIP-Backdoor-Samples), implemented here. The
signal needs k above the number of poisons among a poison's neighbours: at a high poison rate the poisons
are each other's neighbours and look dense.
"""
import numpy as np

from detectors.base import Detector

TINY = 1e-12  # distances of duplicated images are 0: kept off log(0)


def dao(embeddings: np.ndarray, k: int) -> np.ndarray:
    """log DAO scores [N] of `embeddings` [N, D] against each other. ValueError if N <= k."""
    from scipy.special import logsumexp
    from sklearn.neighbors import NearestNeighbors

    if len(embeddings) <= k:
        raise ValueError(f"density: {len(embeddings)} embeddings for k={k}: needs more than k")
    dist, index = NearestNeighbors(n_neighbors=k + 1).fit(embeddings).kneighbors(embeddings)
    dist, index = dist[:, 1:] + TINY, index[:, 1:]  # each point is its own nearest: dropped
    d_k = dist[:, -1]
    lid = -k / np.minimum(np.log(dist / d_k[:, None]).sum(axis=1), -TINY)
    return logsumexp(lid[index] * np.log(d_k[:, None] / d_k[index]), axis=1) - np.log(k)


class Density(Detector):
    def __init__(self, k: float, reference: float):
        if k < 1 or k != int(k) or reference <= k or reference != int(reference):
            raise ValueError(f"density: k must be a whole number >= 1 and reference a whole number > k, "
                             f"got k={k}, reference={reference}")
        self.k, self.reference = int(k), int(reference)

    def score(self, image, text):
        """log DAO [N] of the image embeddings [N, D] (the captions are not used). ValueError if a chunk has at
        most k pairs (fewer than k + 1 pairs in all)."""
        n, chunks = len(image), max(1, len(image) // self.reference)
        # equal chunks of at least `reference` pairs (the last takes the remainder)
        bounds = [round(i * n / chunks) for i in range(chunks + 1)]
        return np.concatenate([dao(image[a:b].astype(np.float64), self.k) for a, b in zip(bounds, bounds[1:])])
