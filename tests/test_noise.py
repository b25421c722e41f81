"""Label-noise injection (rosjax.data.noise): rates, flip targets, determinism."""
import numpy as np
import pytest

from rosjax.data import noise

N = 100_000


def within_binomial(count, trials, rate, sigmas=4.0):
    """True when `count` successes in `trials` is within `sigmas` std of rate * trials."""
    std = np.sqrt(trials * rate * (1 - rate))
    return abs(count - trials * rate) <= sigmas * std


@pytest.fixture(scope="module")
def clean():
    return np.random.default_rng(0).integers(0, 5, N)  # 5 classes


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_symmetric_rate_and_uniform_other_class(clean, rate):
    noisy = noise.symmetric_noise(clean, rate, 5, seed=1)
    changed = noisy != clean
    # The convention: `rate` is the fraction changed, not rate * (C - 1) / C.
    assert within_binomial(changed.sum(), N, rate)
    for c in range(5):
        from_c = noisy[changed & (clean == c)]
        assert not (from_c == c).any()
        counts = np.bincount(from_c, minlength=5)
        others = [k for k in range(5) if k != c]
        for k in others:  # each other class gets 1/4 of the flips of class c
            assert within_binomial(counts[k], len(from_c), 0.25)


@pytest.mark.parametrize("rate", [0.2, 0.45])
def test_pair_flip_goes_to_next_class(clean, rate):
    noisy = noise.pair_flip_noise(clean, rate, 5, seed=2)
    changed = noisy != clean
    np.testing.assert_array_equal(noisy[changed], (clean[changed] + 1) % 5)
    for c in range(5):
        assert within_binomial(changed[clean == c].sum(), (clean == c).sum(), rate)


def test_multilabel_flip_rate_per_label():
    rng = np.random.default_rng(3)
    clean = (rng.random((20_000, 6)) < [0.01, 0.05, 0.1, 0.3, 0.5, 0.9]).astype(np.uint8)
    noisy = noise.multilabel_flip_noise(clean, 0.15, seed=4)
    assert noisy.dtype == clean.dtype and set(np.unique(noisy)) <= {0, 1}
    for j in range(6):
        for value in (0, 1):  # 0 -> 1 and 1 -> 0 flip at the same rate
            rows = clean[:, j] == value
            assert within_binomial((noisy[rows, j] != value).sum(), rows.sum(), 0.15)


def test_noise_is_deterministic_by_seed(clean):
    a = noise.add_label_noise(clean, mode="symmetric", rate=0.3, seed=5, num_classes=5)
    b = noise.add_label_noise(clean, mode="symmetric", rate=0.3, seed=5, num_classes=5)
    c = noise.add_label_noise(clean, mode="symmetric", rate=0.3, seed=6, num_classes=5)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    assert not np.array_equal(a.noisy, c.noisy)
    np.testing.assert_array_equal(a.clean, clean)


def test_rate_zero_and_one(clean):
    np.testing.assert_array_equal(noise.pair_flip_noise(clean, 0.0, 5, seed=0), clean)
    np.testing.assert_array_equal(noise.pair_flip_noise(clean, 1.0, 5, seed=0), (clean + 1) % 5)


def test_noise_rate_counts_changed_labels():
    one = noise.NoisyLabels(clean=np.array([0, 1, 2, 3]), noisy=np.array([0, 2, 2, 0]))
    assert one.noise_rate() == 0.5
    assert one.noise_rate(np.array([0, 2])) == 0.0
    assert one.noise_rate(np.array([1, 3])) == 1.0
    multi = noise.NoisyLabels(clean=np.array([[0, 1], [1, 1]]), noisy=np.array([[1, 1], [1, 1]]))
    assert multi.noise_rate() == 0.25  # one entry of four
    assert multi.noise_rate([1]) == 0.0


def test_noise_rejects_bad_input(clean):
    with pytest.raises(ValueError, match="rate"):
        noise.symmetric_noise(clean, 1.2, 5, seed=0)
    with pytest.raises(ValueError, match=r"labels\[2\] = 7"):
        noise.pair_flip_noise(np.array([0, 1, 7]), 0.1, 5, seed=0)
    with pytest.raises(ValueError, match="unknown noise mode"):
        noise.add_label_noise(clean, mode="asym", rate=0.1, seed=0, num_classes=5)
    with pytest.raises(ValueError, match="needs num_classes"):
        noise.add_label_noise(clean, mode="pair", rate=0.1, seed=0)
    with pytest.raises(ValueError, match="'flip' is for"):
        noise.add_label_noise(np.zeros((4, 3), int), mode="symmetric", rate=0.1, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        noise.multilabel_flip_noise(np.array([[0, 2]]), 0.1, seed=0)
