"""rosjax.eval.stats against independent references: numpy/statistics, scikit-learn, scipy.stats.bootstrap."""
import statistics

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, roc_auc_score

from rosjax.eval import stats


def _counts(indices, n):
    """Multiplicities [R, n] of explicit resample indices [R, n]."""
    return np.stack([np.bincount(row, minlength=n) for row in indices]).astype(np.float64)


def test_mean_std_is_the_sample_std():
    values = [0.71, 0.69, 0.74]
    mean, std = stats.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert stats.mean_std([0.5]) == (0.5, None)
    assert stats.mean_std([None, 0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(statistics.stdev([0.2, 0.4])))


def test_bootstrap_counts_are_seeded_resamples_of_n():
    a = np.concatenate(list(stats.bootstrap_counts(50, 250, seed=3)))
    b = np.concatenate(list(stats.bootstrap_counts(50, 250, seed=3)))
    c = np.concatenate(list(stats.bootstrap_counts(50, 250, seed=4)))
    assert a.shape == (250, 50) and np.all(a.sum(axis=1) == 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.mean() == pytest.approx(1.0) and a.var() == pytest.approx(1 - 1 / 50, abs=0.05)  # Binomial(n, 1/n)


def test_macro_f1_of_resamples_matches_sklearn():
    rng = np.random.default_rng(0)
    n, c = 60, 4
    y = rng.integers(0, c, n)
    y[y == 3] = 2  # class 3 never true: left out of the macro average, as in rosjax.eval.metrics
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n))
    indices = rng.integers(0, n, size=(20, n))
    got = stats.macro_f1(np.eye(c)[y], np.eye(c)[pred], _counts(indices, n))
    for value, idx in zip(got, indices):
        present = np.unique(y[idx])
        assert value == pytest.approx(f1_score(y[idx], pred[idx], labels=present, average="macro", zero_division=0))


def test_multilabel_macro_f1_and_auroc_of_resamples_match_sklearn():
    rng = np.random.default_rng(1)
    n, c = 80, 3
    y = (rng.random((n, c)) < 0.3).astype(int)
    score = np.round(np.clip(0.3 * y + rng.random((n, c)) * 0.7, 0, 1), 1)  # rounded: many ties
    pred = (score >= 0.5).astype(int)
    indices = rng.integers(0, n, size=(15, n))
    counts = _counts(indices, n)
    f1, auc = stats.macro_f1(y, pred, counts), stats.mean_auroc(y, score, counts)
    for k, idx in enumerate(indices):
        present = [j for j in range(c) if y[idx, j].any()]
        assert f1[k] == pytest.approx(f1_score(y[idx][:, present], pred[idx][:, present], average="macro",
                                               zero_division=0))
        per_class = [roc_auc_score(y[idx, j], score[idx, j]) for j in range(c) if 0 < y[idx, j].sum() < n]
        assert auc[k] == pytest.approx(np.mean(per_class))


def test_one_label_auroc_of_resamples_matches_sklearn_one_vs_rest():
    rng = np.random.default_rng(2)
    n, c = 70, 3
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    indices = rng.integers(0, n, size=(10, n))
    got = stats.mean_auroc(np.eye(c)[y], prob, _counts(indices, n))
    for value, idx in zip(got, indices):
        want = np.mean([roc_auc_score(y[idx] == j, prob[idx, j]) for j in range(c)])
        assert value == pytest.approx(want)


def test_paired_percentile_interval_matches_scipy_bootstrap():
    """The mean difference of paired samples: rosjax's draws against scipy's (Monte Carlo error ~0.003)."""
    rng = np.random.default_rng(5)
    n = 200
    a = rng.normal(0.3, 1.0, n)
    b = a - 0.15 + rng.normal(0.0, 0.8, n)  # correlated with a: pairing matters
    replicates = np.concatenate([(counts @ a - counts @ b) / n
                                 for counts in stats.bootstrap_counts(n, 4000, seed=0)])
    ours = stats.percentile_interval(replicates, float(np.mean(a - b)))
    ref = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                paired=True, vectorized=True, method="percentile", n_resamples=4000,
                                confidence_level=0.95, random_state=np.random.default_rng(1))
    assert ours["low"] == pytest.approx(ref.confidence_interval.low, abs=0.015)
    assert ours["high"] == pytest.approx(ref.confidence_interval.high, abs=0.015)
    assert ours["estimate"] == pytest.approx(0.15, abs=0.1) and ours["resamples"] == 4000
    assert ours["excludes_zero"] == (ref.confidence_interval.low > 0)


def test_percentile_interval_marks_an_interval_excluding_zero():
    assert stats.percentile_interval(np.linspace(0.01, 0.05, 101), 0.03)["excludes_zero"]
    crossing = stats.percentile_interval(np.linspace(-0.01, 0.05, 101), 0.02)
    assert not crossing["excludes_zero"]
    assert crossing["low"] == pytest.approx(-0.01 + 0.06 * 0.025)
    assert crossing["high"] == pytest.approx(0.05 - 0.06 * 0.025)
    assert stats.percentile_interval([np.nan, np.nan], 0.0)["low"] is None
