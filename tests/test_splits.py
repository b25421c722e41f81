"""Grouped splits, fold seeds and overlapping teacher subsets (rosjax.data.splits)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosjax.data import splits

FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
# ISIC-2019-like class frequencies: DF (5) and VASC (6) are about 1% of the images.
ONE_LABEL_P = np.array([0.18, 0.50, 0.13, 0.034, 0.10, 0.01, 0.01, 0.036])
# NIH-like label prevalences: the last label (Hernia) is 0.2%.
MULTI_LABEL_P = np.array([0.10, 0.03, 0.12, 0.18, 0.05, 0.06, 0.012, 0.05, 0.04, 0.02,
                          0.02, 0.015, 0.03, 0.002])


@pytest.fixture(scope="module")
def table():
    """30,000 patients with 1-6 images each, one-label and multi-label labels per image."""
    rng = np.random.default_rng(1234)
    images_per_patient = rng.integers(1, 7, 30_000)
    groups = np.repeat(np.array([f"P{i:05d}" for i in range(30_000)]), images_per_patient)
    n = len(groups)
    one = rng.choice(len(ONE_LABEL_P), n, p=ONE_LABEL_P / ONE_LABEL_P.sum())
    multi = (rng.random((n, len(MULTI_LABEL_P))) < MULTI_LABEL_P).astype(np.uint8)
    return groups, {"one": one, "multi": multi}


@pytest.fixture(scope="module")
def computed(table):
    groups, labels = table
    return {kind: splits.grouped_split(groups, lab, seed=7) for kind, lab in labels.items()}


@pytest.mark.parametrize("kind", ["one", "multi"])
def test_split_is_grouped_partition_with_target_sizes(table, computed, kind):
    groups, _ = table
    result = computed[kind]
    assert set(result) == set(FRACTIONS)
    everything = np.concatenate(list(result.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(groups)))
    for name, idx in result.items():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
        assert abs(len(idx) / len(groups) - FRACTIONS[name]) <= 0.01 * FRACTIONS[name]
    patients = {name: set(groups[idx]) for name, idx in result.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert set(splits.shared_groups(groups, result).values()) == {0}


def test_one_label_class_proportions_and_rare_classes(table, computed):
    _, labels = table
    one = labels["one"]
    for name, idx in computed["one"].items():
        per_class = np.bincount(one[idx], minlength=8)
        share = per_class / np.bincount(one, minlength=8)
        assert per_class[5] > 0 and per_class[6] > 0, name  # DF and VASC in every split
        np.testing.assert_allclose(share, FRACTIONS[name], atol=0.01)


def test_multi_label_proportions_and_rare_label(table, computed):
    _, labels = table
    multi = labels["multi"]
    for name, idx in computed["multi"].items():
        positives = multi[idx].sum(axis=0)
        assert positives[-1] > 0, name  # Hernia (0.2%) in every split
        np.testing.assert_allclose(positives / multi.sum(axis=0), FRACTIONS[name], atol=0.01)
        no_finding = (multi[idx].sum(axis=1) == 0).sum() / (multi.sum(axis=1) == 0).sum()
        assert abs(no_finding - FRACTIONS[name]) < 0.01


def test_split_deterministic_by_seed_and_changes_with_seed(table, computed):
    groups, labels = table
    again = splits.grouped_split(groups, labels["one"], seed=7)
    other = splits.grouped_split(groups, labels["one"], seed=8)
    for name in FRACTIONS:
        np.testing.assert_array_equal(again[name], computed["one"][name])
    assert not np.array_equal(other["test"], computed["one"]["test"])


@pytest.mark.parametrize("seed", range(5))
def test_class_with_three_groups_reaches_every_split(seed):
    # 20 singleton groups; class 1 only in groups a, b, c (one image each).
    groups = np.array(list("abcdefghijklmnopqrst"))
    labels = np.array([1, 1, 1] + [0] * 17)
    result = splits.grouped_split(groups, labels, seed=seed)
    for name, idx in result.items():
        assert (labels[idx] == 1).sum() == 1, name


def test_two_fractions_give_train_and_test():
    groups = np.repeat(np.arange(100).astype(str), 2)
    labels = np.tile([0, 1], 100)
    result = splits.grouped_split(groups, labels, fractions=(0.8, 0.2), seed=0)
    assert set(result) == {"train", "test"}
    assert (len(result["train"]), len(result["test"])) == (160, 40)


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match=r"groups\[1\] is empty"):
        splits.grouped_split(np.array(["a", "", "b"]), np.array([0, 1, 0]), seed=0)
    with pytest.raises(ValueError, match="fractions"):
        splits.grouped_split(np.array(["a", "b"]), np.array([0, 1]), fractions=(0.5, 0.4), seed=0)
    with pytest.raises(ValueError, match="rows"):
        splits.grouped_split(np.array(["a", "b"]), np.array([0, 1, 1]), seed=0)
    with pytest.raises(ValueError, match="0/1"):
        splits.grouped_split(np.array(["a", "b"]), np.array([[0, 2], [1, 0]]), seed=0)


def test_shared_groups_counts_a_leak():
    groups = np.array(["a", "a", "b", "b", "c", "d"])
    leaky = {"train": np.array([0, 2]), "validation": np.array([3, 4]), "test": np.array([1, 5])}
    assert splits.shared_groups(groups, leaky) == {
        "train/validation": 1, "train/test": 1, "validation/test": 0}


def test_official_split_keeps_test_list_and_carves_validation_by_patient():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(2000), rng.integers(1, 5, 2000))
    groups = np.char.add("p", patients.astype(str))
    labels = (rng.random((len(groups), 5)) < 0.1).astype(np.uint8)
    test_mask = patients % 5 == 0  # the "official" test list: whole patients
    result = splits.official_split(test_mask, groups, labels, validation_fraction=0.125, seed=3)
    np.testing.assert_array_equal(result["test"], np.flatnonzero(test_mask))
    train_val = np.flatnonzero(~test_mask)
    np.testing.assert_array_equal(np.sort(np.concatenate([result["train"], result["validation"]])),
                                  train_val)
    assert abs(len(result["validation"]) / len(train_val) - 0.125) < 0.01
    assert set(splits.shared_groups(groups, result).values()) == {0}


def test_official_split_rejects_patient_on_both_lists():
    groups = np.array(["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="1 groups are in both"):
        splits.official_split(np.array([True, False, False, False]), groups,
                              np.array([0, 1, 0, 1]), validation_fraction=0.5, seed=0)


def test_fold_seeds():
    seeds = splits.fold_seeds(0, 3)
    assert len(set(seeds)) == 3 and all(0 <= s < 2**32 for s in seeds)
    assert splits.fold_seeds(0, 3) == seeds
    assert splits.fold_seeds(1, 3) != seeds
    assert splits.fold_seeds(0, 5)[:3] == seeds


# ------------------------------------------------------------------- overlapping subsets


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 8), overlap=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_overlapping_subsets_structure(n, k, overlap, seed):
    k = min(k, n)
    indices = np.random.default_rng(n).choice(10 * n, n, replace=False)  # distinct, unsorted
    subsets = splits.overlapping_subsets(indices, k, overlap, seed)
    assert len(subsets) == k
    core_size = math.floor(overlap * n + 0.5)
    core = set(subsets[0]).intersection(*map(set, subsets[1:]))
    if k > 1:
        assert len(core) == core_size
        for i in range(k):
            for j in range(i + 1, k):
                assert set(subsets[i]) & set(subsets[j]) == core
    shares = sorted(len(s) - core_size for s in subsets)
    assert sum(shares) == n - core_size and shares[-1] - shares[0] <= 1
    assert set(np.concatenate(subsets)) == set(indices.tolist())
    for s in subsets:
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)
    again = splits.overlapping_subsets(indices, k, overlap, seed)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(5, 200), k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_overlapping_subsets_extremes(n, k, seed):
    indices = np.arange(100, 100 + n)
    disjoint = splits.overlapping_subsets(indices, k, 0.0, seed)
    np.testing.assert_array_equal(np.sort(np.concatenate(disjoint)), indices)  # a partition
    for s in splits.overlapping_subsets(indices, k, 1.0, seed):
        np.testing.assert_array_equal(s, indices)


def test_overlapping_subsets_paper_setting_and_seed():
    indices = np.arange(1000)
    subsets = splits.overlapping_subsets(indices, 5, 0.4, seed=0)
    assert [len(s) for s in subsets] == [400 + 120] * 5
    other = splits.overlapping_subsets(indices, 5, 0.4, seed=1)
    assert not np.array_equal(subsets[0], other[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_subsets=2, overlap=1.5), r"overlap must be in \[0, 1\]"),
    (dict(num_subsets=2, overlap=-0.1), r"overlap must be in \[0, 1\]"),
    (dict(num_subsets=0, overlap=0.4), "num_subsets must be"),
    (dict(num_subsets=11, overlap=0.4), "more than the 10 examples"),
])
def test_overlapping_subsets_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        splits.overlapping_subsets(np.arange(10), seed=0, **kwargs)
