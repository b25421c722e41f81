"""Synthetic label noise: symmetric, pair-flip and per-label flips, with the clean labels kept.

The paper studies real annotation noise; injecting known noise on top lets a run measure how
much of it each teacher subset saw and how robust each model is to it. Every draw comes from
`np.random.default_rng(seed)`, so a seed gives the same noisy labels on every machine.

Conventions (each applies to every example independently):
  * "symmetric" (one-label, C classes): with probability `rate` the label is replaced by a
    class drawn uniformly from the C - 1 *other* classes, so `rate` is exactly the expected
    fraction of changed labels (some papers draw from all C classes, which changes only
    rate * (C - 1) / C of them).
  * "pair" (one-label): with probability `rate`, class c becomes (c + 1) mod C, the
    class-conditional pair flip of Han et al. (Co-teaching, 2018).
  * "flip" (multi-label, [N, C] multi-hot): every entry is flipped 0 <-> 1 independently with
    probability `rate`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MODES = ("symmetric", "pair", "flip")


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
    """Clean labels and their noisy copy, row for row ([N] ints or [N, C] multi-hot)."""
    clean: np.ndarray
    noisy: np.ndarray

    def __post_init__(self):
        if self.clean.shape != self.noisy.shape:
            raise ValueError(f"clean {self.clean.shape} and noisy {self.noisy.shape} differ in shape")

    def changed(self) -> np.ndarray:
        """Bool mask of changed entries: [N] for one-label, [N, C] for multi-label."""
        return self.clean != self.noisy

    def noise_rate(self, indices: np.ndarray | None = None) -> float:
        """Fraction of labels changed among `indices` (all rows if None).

        One-label: fraction of rows whose class changed. Multi-label: fraction of (row, label)
        entries flipped.
        """
        changed = self.changed() if indices is None else self.changed()[np.asarray(indices)]
        return float(changed.mean()) if changed.size else 0.0


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")


def _check_one_label(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"one-label noise needs [N] integer labels, got {labels.dtype} "
                         f"{labels.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"labels[{bad[0]}] = {labels[bad[0]]} is outside [0, {num_classes})")
    return labels


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int,
                    seed: int) -> np.ndarray:
    """With probability `rate` replaces each label by a uniform draw from the other classes."""
    labels = _check_one_label(labels, num_classes)
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.shape) < rate  # [N]
    offset = rng.integers(1, num_classes, labels.shape)  # [N] in 1..C-1: never the same class
    return np.where(flip, (labels + offset) % num_classes, labels).astype(labels.dtype)


def pair_flip_noise(labels: np.ndarray, rate: float, num_classes: int,
                    seed: int) -> np.ndarray:
    """With probability `rate` maps class c to (c + 1) mod num_classes."""
    labels = _check_one_label(labels, num_classes)
    _check_rate(rate)
    flip = np.random.default_rng(seed).random(labels.shape) < rate  # [N]
    return np.where(flip, (labels + 1) % num_classes, labels).astype(labels.dtype)


def multilabel_flip_noise(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Flips every entry of a [N, C] 0/1 multi-hot array independently with probability `rate`."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"multi-label noise needs [N, C] 0/1 labels, got shape {labels.shape}")
    _check_rate(rate)
    flip = np.random.default_rng(seed).random(labels.shape) < rate  # [N, C]
    return np.where(flip, 1 - labels, labels).astype(labels.dtype)


def add_label_noise(labels: np.ndarray, *, mode: str, rate: float, seed: int,
                    num_classes: int | None = None) -> NoisyLabels:
    """Returns `NoisyLabels(clean=labels, noisy=...)` for one of `MODES` (see module docstring).

    Args:
      labels: [N] class ids ("symmetric", "pair") or [N, C] multi-hot ("flip").
      mode: "symmetric", "pair" or "flip".
      rate: probability that a label (or, for "flip", an entry) is changed, in [0, 1].
      seed: seed of the noise draw.
      num_classes: number of classes, required by the one-label modes (a class absent from
        `labels` still counts as a flip target).
    """
    labels = np.asarray(labels)
    if mode in MODES and (mode == "flip") != (labels.ndim == 2):
        raise ValueError(f"noise mode {mode!r} does not fit labels of shape {labels.shape}: "
                         "'flip' is for [N, C] multi-hot labels, 'symmetric' and 'pair' for [N] ids")
    if mode == "flip":
        noisy = multilabel_flip_noise(labels, rate, seed)
    elif mode in ("symmetric", "pair"):
        if num_classes is None:
            raise ValueError(f"mode {mode!r} needs num_classes")
        noise_fn = symmetric_noise if mode == "symmetric" else pair_flip_noise
        noisy = noise_fn(labels, rate, num_classes, seed)
    else:
        raise ValueError(f"unknown noise mode {mode!r}; expected one of {MODES}")
    return NoisyLabels(clean=labels.copy(), noisy=noisy)
