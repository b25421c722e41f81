"""Grouped train/validation/test splits, per-run fold seeds and overlapping teacher subsets.

Medical datasets hold several images per patient (NIH ChestX-ray14) or per lesion (ISIC 2019).
An image of a patient in the training split and another of the same patient in the test split
leak the patient, so every split here is *grouped*: all rows of a group land in one split.

`grouped_split` is a seeded, stratified greedy group assignment. Groups are taken rarest class
first (the class held by the fewest groups), larger groups before smaller ones, random order
inside a tie, and each group goes to the split that is relatively furthest below its target
count for the group's rarest class. A split holding no example of a class is 100% below its
target, so a class whose groups all have it as their rarest class reaches every split once it
has at least three groups (ISIC's DF and VASC). Multi-label rows are handled the same way, with
an extra "no positive label" class so that "No Finding" rows are spread in proportion too.
Everything is computed from group ids and labels at run time; no image is decoded.

`overlapping_subsets` cuts a training split into the paper's overlapping teacher subsets.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


def fold_seeds(base_seed: int, num_folds: int) -> list[int]:
    """Returns `num_folds` independent 32-bit seeds derived from `base_seed`.

    The paper reports three independent runs; run i uses `grouped_split(..., seed=seeds[i])`.
    The seeds come from `np.random.SeedSequence(base_seed)`, so they are well mixed and stable.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    return [int(s) for s in np.random.SeedSequence(base_seed).generate_state(num_folds)]


def _group_ids(groups: Sequence[str] | np.ndarray) -> tuple[np.ndarray, int]:
    """Maps group names to dense ids 0..G-1; returns (ids [N], G). Rejects empty names."""
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be 1-D [N], got shape {groups.shape}")
    if groups.dtype.kind in "USO":
        empty = np.flatnonzero((groups == "") | (groups == None))  # noqa: E711 (elementwise)
        if empty.size:
            raise ValueError(
                f"groups[{empty[0]}] is empty ({empty.size} empty ids in all); give every ungrouped "
                "example its own id (e.g. its image id) before splitting")
    names, ids = np.unique(groups, return_inverse=True)
    return ids.reshape(-1), len(names)


def _class_matrix(labels: np.ndarray, num_rows: int) -> np.ndarray:
    """Returns a [N, K] 0/1 matrix of the classes each row holds.

    One-label [N] ints become one-hot over max+1 classes. Multi-hot [N, C] gets one extra
    column that is 1 for rows without any positive label.
    """
    labels = np.asarray(labels)
    if labels.shape[:1] != (num_rows,):
        raise ValueError(f"labels has {labels.shape[:1]} rows but groups has {num_rows}")
    if labels.ndim == 1:
        if labels.dtype.kind not in "iu":
            raise ValueError(f"one-label labels must be integers, got dtype {labels.dtype}")
        if num_rows and labels.min() < 0:
            raise ValueError(f"labels[{int(np.argmin(labels))}] = {labels.min()} is negative")
        num_classes = int(labels.max()) + 1 if num_rows else 0
        onehot = np.zeros((num_rows, num_classes), np.int64)
        onehot[np.arange(num_rows), labels] = 1
        return onehot
    if labels.ndim == 2:
        bad = np.flatnonzero(~np.isin(labels, (0, 1)).all(axis=1))
        if bad.size:
            raise ValueError(f"multi-hot labels must be 0/1; row {bad[0]} is {labels[bad[0]]}")
        hot = labels.astype(np.int64)
        return np.concatenate([hot, (hot.sum(axis=1) == 0)[:, None].astype(np.int64)], axis=1)
    raise ValueError(f"labels must be [N] ints or [N, C] multi-hot, got shape {labels.shape}")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, np.float64)
    if f.ndim != 1 or f.size < 2 or (f <= 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 2 positive numbers summing to 1, got {fractions}")
    return f


def _assign_groups(group_ids: np.ndarray, num_groups: int, classes: np.ndarray,
                   fractions: np.ndarray, seed: int) -> np.ndarray:
    """Greedy stratified assignment; returns the split number of each group, [G] int."""
    num_splits = len(fractions)
    counts = np.zeros((num_groups, classes.shape[1]), np.int64)  # [G, K] examples per class
    np.add.at(counts, group_ids, classes)
    sizes = np.bincount(group_ids, minlength=num_groups)  # [G] examples per group
    groups_per_class = (counts > 0).sum(axis=0)  # [K]
    # Rarest class of each group: the class held by the fewest groups (ties: lowest class id).
    rarity = np.where(counts > 0, groups_per_class[None, :], np.iinfo(np.int64).max)  # [G, K]
    rarest = np.argmin(rarity, axis=1)  # [G]
    # Order: rarest class first, then larger groups first, then a seeded random order.
    tiebreak = np.random.default_rng(seed).permutation(num_groups)
    order = np.lexsort((tiebreak, -sizes, groups_per_class[rarest]))

    class_target = fractions[:, None] * counts.sum(axis=0)[None, :]  # [S, K]
    size_target = fractions * sizes.sum()  # [S]
    class_have = np.zeros_like(class_target)  # [S, K]
    size_have = np.zeros(num_splits)  # [S]
    assignment = np.empty(num_groups, np.int64)
    for g in order:
        c = rarest[g]
        class_gap = 1.0 - class_have[:, c] / class_target[:, c]  # [S] relative shortfall
        size_gap = 1.0 - size_have / size_target  # [S]
        best = max(range(num_splits), key=lambda s: (class_gap[s], size_gap[s]))
        assignment[g] = best
        class_have[best] += counts[g]
        size_have[best] += sizes[g]
    return assignment


def _indices_by_split(group_ids: np.ndarray, assignment: np.ndarray,
                      names: Sequence[str]) -> dict[str, np.ndarray]:
    row_split = assignment[group_ids]  # [N]
    return {name: np.flatnonzero(row_split == s).astype(np.int64) for s, name in enumerate(names)}


def grouped_split(groups: Sequence[str] | np.ndarray, labels: np.ndarray, *,
                  fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int) -> dict[str, np.ndarray]:
    """Splits rows into train/validation/test so that no group is in two splits.

    Args:
      groups: [N] group id of each row (patient id for NIH, lesion id for ISIC); must not be
        empty: give ungrouped rows their own id (their image id).
      labels: [N] int class ids (one-label) or [N, C] 0/1 multi-hot (multi-label).
      fractions: target share of rows in (train, validation, test); two or three numbers
        summing to 1 (two give train/test).
      seed: seed of the random tie-break order; use `fold_seeds` for independent runs.

    Returns:
      {"train": idx, "validation": idx, "test": idx}: sorted int64 row indices that together
      cover every row once.
    """
    fractions = _check_fractions(fractions)
    if len(fractions) > len(SPLIT_NAMES):
        raise ValueError(f"at most {len(SPLIT_NAMES)} fractions, got {len(fractions)}")
    group_ids, num_groups = _group_ids(groups)
    classes = _class_matrix(labels, len(group_ids))
    assignment = _assign_groups(group_ids, num_groups, classes, fractions, seed)
    names = SPLIT_NAMES if len(fractions) == 3 else ("train", "test")
    return _indices_by_split(group_ids, assignment, names)


def official_split(official_test_mask: np.ndarray, groups: Sequence[str] | np.ndarray,
                   labels: np.ndarray, validation_fraction: float,
                   seed: int) -> dict[str, np.ndarray]:
    """NIH's official split: test = the official test list; validation carved from the rest.

    Args:
      official_test_mask: [N] bool, True for rows named in `test_list.txt`.
      groups: [N] patient ids.
      labels: [N] ints or [N, C] multi-hot, used to stratify the validation carve-out.
      validation_fraction: share of the train_val rows that go to validation, in (0, 1).
      seed: seed of the carve-out.

    Returns:
      {"train", "validation", "test"} sorted int64 row indices. Raises if a patient is on both
      official lists (the official lists are patient-disjoint).
    """
    test_mask = np.asarray(official_test_mask, bool)
    group_ids, _ = _group_ids(groups)
    if test_mask.shape != group_ids.shape:
        raise ValueError(f"official_test_mask has shape {test_mask.shape}, groups {group_ids.shape}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    shared = np.intersect1d(group_ids[test_mask], group_ids[~test_mask])
    if shared.size:
        row = int(np.flatnonzero(test_mask & np.isin(group_ids, shared))[0])
        raise ValueError(f"{shared.size} groups are in both the official test list and train_val "
                         f"(first: group {np.asarray(groups)[row]!r}, row {row})")
    train_val = np.flatnonzero(~test_mask)
    labels = np.asarray(labels)
    inner = grouped_split(np.asarray(groups)[train_val], labels[train_val],
                          fractions=(1.0 - validation_fraction, validation_fraction), seed=seed)
    return {"train": train_val[inner["train"]], "validation": train_val[inner["test"]],
            "test": np.flatnonzero(test_mask).astype(np.int64)}


def shared_groups(groups: Sequence[str] | np.ndarray,
                  splits: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Number of groups present in both of each pair of splits, e.g. {"train/test": 0}.

    Every value must be 0 for a leak-free split; reports print this as evidence.
    """
    groups = np.asarray(groups)
    members = {name: set(np.unique(groups[idx]).tolist()) for name, idx in splits.items()}
    return {f"{a}/{b}": len(members[a] & members[b])
            for a, b in itertools.combinations(members, 2)}


def split_summary(groups: Sequence[str] | np.ndarray, labels: np.ndarray,
                  splits: Mapping[str, np.ndarray]) -> dict:
    """Sizes, group counts, per-class counts of each split and the groups shared between them.

    Per-class counts are positives per class (multi-label) or rows per class (one-label),
    over the classes of the whole label array. JSON-serialisable, for reports.
    """
    groups = np.asarray(groups)
    labels = np.asarray(labels)
    num_classes = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
    total = sum(len(idx) for idx in splits.values())
    summary = {}
    for name, idx in splits.items():
        if labels.ndim == 2:
            per_class = labels[idx].sum(axis=0)
        else:
            per_class = np.bincount(labels[idx], minlength=num_classes)
        summary[name] = {"examples": int(len(idx)), "fraction": len(idx) / max(total, 1),
                         "groups": int(len(np.unique(groups[idx]))),
                         "per_class": [int(v) for v in per_class]}
    summary["shared_groups"] = shared_groups(groups, splits)
    return summary


def overlapping_subsets(indices: np.ndarray, num_subsets: int, overlap: float,
                        seed: int) -> list[np.ndarray]:
    """Cuts a training split into `num_subsets` overlapping teacher subsets (RoS-KD, Sec. III).

    A shared core of round(overlap * n) indices (half rounds up) goes to every subset; the other
    indices are dealt into `num_subsets` disjoint shares whose sizes differ by at most one, one
    per subset. overlap=0 is a disjoint partition, overlap=1 gives every subset all indices;
    the union is always the whole split. Which indices form the core and the shares is drawn
    with `np.random.default_rng(seed)`.

    Args:
      indices: [n] distinct row indices of the training split.
      num_subsets: number of teachers K, 1 <= K <= n.
      overlap: the paper's overlap ratio p, the share of the split every teacher sees, in [0, 1].
      seed: seed of the draw.

    Returns:
      K sorted int64 index arrays; subset k = core + share k.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices contain duplicates")
    if not isinstance(num_subsets, (int, np.integer)) or num_subsets < 1:
        raise ValueError(f"num_subsets must be an integer >= 1, got {num_subsets!r}")
    if num_subsets > len(indices):
        raise ValueError(f"num_subsets={num_subsets} is more than the {len(indices)} examples")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    shuffled = np.random.default_rng(seed).permutation(indices.astype(np.int64))  # [n]
    core_size = int(np.floor(overlap * len(indices) + 0.5))
    core, rest = shuffled[:core_size], shuffled[core_size:]
    return [np.sort(np.concatenate([core, share])) for share in np.array_split(rest, num_subsets)]
