"""Uncertainty of the report's numbers: mean ± std over training seeds, paired bootstrap over test examples.

* `mean_std(values)`: the mean and the *sample* standard deviation (ddof = 1) of per-seed values
  (None for fewer than two values), what Table I shows as `mean ± std`.
* `bootstrap_counts(n, n_resamples, seed)`: the resamples of a test set of `n` examples, drawn
  with replacement from a seeded numpy Generator, as multiplicities [R, n] (how often each
  example is in a resample). One set of draws serves every model and every training seed, so the
  models' differences are *paired*: each replicate compares them on the same resampled examples.
* `macro_f1(truth, pred, counts)` and `mean_auroc(truth, score, counts)`: Table I's macro-F1 and
  mean AUROC (the conventions of `rosjax.eval.metrics`: macro over the classes present in the
  resample, AUROC over the classes with positives and negatives in it, ties counted half) of
  every resample at once, from the multiplicities: a resample holding example i k times is
  scored as the test set with example i repeated k times.
* `percentile_interval(replicates, point, confidence)`: the bootstrap percentile interval
  (scipy.stats.bootstrap's method='percentile'), marked when it excludes 0.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
_CHUNK = 100  # resamples drawn per Generator call (a constant: the draws depend on the seed alone)


def mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof = 1) of the non-None values; std None below two values."""
    finite = np.asarray([v for v in values if v is not None], np.float64)
    if finite.size == 0:
        return None, None
    return float(finite.mean()), (float(finite.std(ddof=1)) if finite.size > 1 else None)


def bootstrap_counts(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yields float64 [r, n] multiplicities, r <= 100 per chunk, `n_resamples` rows in all.

    Each row is one resample: n indices drawn uniformly with replacement, counted per example.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, _CHUNK):
        r = min(_CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))  # [r, n] example indices
        flat = (idx + n * np.arange(r)[:, None]).ravel()
        yield np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def macro_f1(truth: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro-F1 [R] of each resample; `truth`, `pred` 0/1 [N, C], `counts` [R, N].

    Per class F1 = 2 TP / (positives + predicted positives), averaged over the classes with a
    positive in the resample (NaN when none has one).
    """
    truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
    tp = counts @ (truth * pred)  # [R, C]
    positives, predicted = counts @ truth, counts @ pred  # [R, C]
    present = positives > 0
    f1 = np.where(present, 2.0 * tp / np.where(present, positives + predicted, 1.0), np.nan)
    return _nanmean_rows(f1)


def mean_auroc(truth: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean AUROC [R] of each resample; `truth` 0/1 [N, C], `score` [N, C], `counts` [R, N].

    Per class, the weighted Mann-Whitney statistic: the share of (positive, negative) pairs of
    the resample that the scores order correctly, tied scores counting one half; averaged over
    the classes where the resample has positives and negatives (NaN when none has both).
    """
    truth, score = np.asarray(truth, np.float64), np.asarray(score, np.float64)
    per_class = np.full((counts.shape[0], truth.shape[1]), np.nan)  # [R, C]
    for c in range(truth.shape[1]):
        order = np.argsort(score[:, c], kind="stable")
        s, y = score[order, c], truth[order, c]  # ascending scores
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tie group
        w = counts[:, order]  # [R, N]
        pos = np.add.reduceat(w * y, starts, axis=1)  # [R, G] positive weight per tie group
        neg = np.add.reduceat(w * (1.0 - y), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
        pairs = pos.sum(axis=1) * neg.sum(axis=1)  # [R]
        correct = np.sum(pos * (below + 0.5 * neg), axis=1)
        per_class[:, c] = np.where(pairs > 0, correct / np.where(pairs > 0, pairs, 1.0), np.nan)
    return _nanmean_rows(per_class)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row means [R] over the non-NaN entries of [R, C]; NaN for a row without any."""
    defined = ~np.isnan(values)
    total = np.where(defined, values, 0.0).sum(axis=1)
    n = defined.sum(axis=1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def percentile_interval(replicates, point: float, confidence: float = CONFIDENCE) -> dict:
    """The percentile bootstrap interval of a statistic from its replicates [R] (NaN ones dropped).

    Returns {'estimate': point, 'low', 'high', 'confidence', 'resamples' (replicates used),
    'excludes_zero'}.
    """
    values = np.asarray(replicates, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"estimate": float(point), "low": None, "high": None, "confidence": confidence, "resamples": 0,
                "excludes_zero": False}
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return {"estimate": float(point), "low": float(low), "high": float(high), "confidence": confidence,
            "resamples": int(values.size), "excludes_zero": bool(low > 0 or high < 0)}
