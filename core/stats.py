"""Uncertainty of the study's figures: over seeds (Student's t), over eval images (a binomial interval),
and for the paired contrast of two objectives seed by seed (t interval, sign test, sign-flip permutation
test). scipy.stats does the distributions and tests; these functions only name the study's uses of them.
Proportions are fractions in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
EXACT_PAIRS = 16  # the permutation test enumerates every sign flip up to this many pairs


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean over seeds and its Student-t interval: mean +- t(n-1) * sd / sqrt(n).

    Returns {mean, low, high, sd, n}; low/high are None for fewer than 2 values (no spread to estimate).
    Raises ValueError on no values or a value that is not finite."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"mean_interval needs finite values, got {list(values)}")
    out = {"mean": float(x.mean()), "low": None, "high": None, "sd": None, "n": int(x.size)}
    if x.size >= 2:
        sd = float(x.std(ddof=1))
        low, high = (float(v) for v in stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=sd / math.sqrt(x.size))
                     ) if sd > 0 else (out["mean"], out["mean"])
        out |= {"sd": sd, "low": low, "high": high}
    return out


def binomial_interval(rate: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The eval set's own sampling error: Wilson score interval of a rate measured on n images
    (scipy.stats.binomtest(...).proportion_ci(method="wilson")). Raises ValueError for n < 1 or a rate
    that is not k/n for an integer k."""
    if n < 1:
        raise ValueError(f"binomial_interval needs n >= 1 images, got {n}")
    k = round(rate * n)
    if not 0 <= k <= n or abs(k - rate * n) > 1e-6 * n:
        raise ValueError(f"rate {rate} is not a count out of n={n}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def sampling_half_width(n: int, confidence: float = CONFIDENCE) -> float:
    """Half the width of the Wilson interval of a rate near 50% (the widest) measured on n images."""
    low, high = binomial_interval((n // 2) / n, n, confidence)
    return (high - low) / 2


def eval_size_for(half_width: float, rate: float = 0.5, confidence: float = CONFIDENCE) -> int:
    """Images needed for a normal-approximation interval of +-half_width on a rate (worst case 0.5):
    n = z^2 p (1 - p) / h^2, z the two-sided normal quantile."""
    if not 0 < half_width < 1:
        raise ValueError(f"half_width must be in (0, 1), got {half_width}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    return math.ceil(z * z * rate * (1 - rate) / half_width ** 2)


def paired_contrast(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """The per-seed difference a - b (same seed, same data, two objectives): its mean with a t interval,
    the exact two-sided sign test (scipy binomtest on the seeds where a > b, ties dropped) and the exact
    sign-flip permutation test of the mean difference (scipy permutation_test, permutation_type="samples").

    Returns {differences, mean, low, high, sd, n, positive, negative, sign_test_p, permutation_p,
    smallest_p}: `smallest_p` is the lowest p-value any outcome could give with this many non-tied pairs
    (2 / 2^n), so a reader sees when no result could reach a given level. Raises ValueError on unequal
    lengths."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_contrast needs two equal-length lists, got {a.size} and {b.size} values")
    d = a - b
    out = {"differences": d.tolist()} | mean_interval(d, confidence)
    positive, negative = int((d > 0).sum()), int((d < 0).sum())
    sign_p = float(stats.binomtest(positive, positive + negative).pvalue) if positive + negative else 1.0
    if d.size >= 2 and np.any(d != 0):
        # exact (all 2^n sign flips) up to 16 pairs; beyond, 100k seeded flips in batches (bounded memory)
        exact = d.size <= EXACT_PAIRS
        perm = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                                      n_resamples=np.inf if exact else 100_000, batch=4096,
                                      rng=None if exact else np.random.default_rng(0))
        perm_p = float(perm.pvalue)
    else:
        perm_p = 1.0
    return out | {"positive": positive, "negative": negative, "sign_test_p": sign_p, "permutation_p": perm_p,
                  "smallest_p": min(1.0, 2 / 2 ** (positive + negative))}


def seeds_for(alpha: float = 0.05) -> int:
    """The fewest seeds with which an exact two-sided sign (or sign-flip) test can reach p < alpha: every
    seed agreeing gives p = 2 / 2^n."""
    return next(n for n in range(1, 64) if 2 / 2 ** n < alpha)


def detection_metrics(scores: Sequence[float], poisoned: Sequence[bool], confidence: float = CONFIDENCE) -> dict:
    """How well `scores` (higher: more likely poisoned) rank the poisoned pairs (`poisoned`, the ground truth):
    AUROC (sklearn.metrics.roc_auc_score) with its Hanley-McNeil (1982) interval, the sampling error of one
    ranking; average precision (sklearn.metrics.average_precision_score; chance level: the poison rate); and
    the recall at the true poison count k (R-precision), the share of poisons among the k top-scored pairs
    (k: what a defender who knows the poison budget would drop). Ties in the top k are broken by position.

    Returns {auroc, auroc_low, auroc_high, average_precision, poison_rate, recall_at_k, k, n}. Raises
    ValueError on unequal lengths, scores that are not finite, or a ground truth with no poison or no clean pair."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = np.asarray(scores, dtype=float), np.asarray(poisoned, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"detection_metrics needs one score per pair: {s.size} scores for {y.size} pairs")
    if not np.isfinite(s).all():
        raise ValueError(f"detection_metrics: {int((~np.isfinite(s)).sum())} scores are not finite")
    k, n = int(y.sum()), int(y.size)
    if k in (0, n):
        raise ValueError(f"detection_metrics needs poisoned and clean pairs, got {k} poisoned of {n}")
    auc = float(roc_auc_score(y, s))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)  # Hanley & McNeil's exponential approximation
    se = math.sqrt((auc * (1 - auc) + (k - 1) * (q1 - auc * auc) + (n - k - 1) * (q2 - auc * auc)) / (k * (n - k)))
    z = stats.norm.ppf(0.5 + confidence / 2)
    top = np.argsort(-s, kind="stable")[:k]
    return {"auroc": auc, "auroc_low": max(0.0, auc - z * se), "auroc_high": min(1.0, auc + z * se),
            "average_precision": float(average_precision_score(y, s)), "poison_rate": k / n,
            "recall_at_k": float(y[top].mean()), "k": k, "n": n}
