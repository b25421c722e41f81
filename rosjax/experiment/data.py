"""The data stage: prepared dataset → grouped split → (noisy) training labels → teacher subsets.

Everything here is recomputed from seeds on every run (it takes milliseconds: no image is
decoded), so the split and the subsets of a resumed or re-run experiment are the ones it
trained on; `summary()` records them for the report.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from rosjax.config import ExperimentConfig
from rosjax.data import DataError, datasets, noise, pipeline, splits


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """What every training and evaluation stage reads."""
    dataset: datasets.PreparedDataset
    splits: dict[str, np.ndarray]          # train / validation / test source rows
    train_labels: np.ndarray               # [N] or [N, C] labels used for training (noisy if injected)
    noisy: noise.NoisyLabels | None        # clean and noisy labels when noise was injected
    subsets: tuple[np.ndarray, ...]        # one array of training rows per teacher

    @property
    def multilabel(self) -> bool:
        return self.dataset.multilabel

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)


def load(cfg: ExperimentConfig, *, split_seed: int | None = None, overlap: float | None = None) -> ExperimentData:
    """Prepares (or opens) the dataset and derives split, labels and subsets from `cfg`.

    `split_seed` and `overlap` override the config's values (the fold and overlap sweeps).
    """
    d = cfg.data
    ds = datasets.prepare(d.dataset, data_dir=os.path.expanduser(d.data_dir),
                          manual_dir=d.manual_dir and os.path.expanduser(d.manual_dir),
                          image_size=d.stored_size, labels=d.labels or None,
                          download=d.download, skip_corrupt_images=d.skip_corrupt_images)
    seed = d.split_seed if split_seed is None else split_seed
    if d.split == "grouped":
        split = splits.grouped_split(ds.groups, ds.labels, fractions=d.fractions, seed=seed)
    elif d.split == "official":
        if ds.official_test is None:
            raise DataError(f"--data.split=official: the prepared {d.dataset} has no official test list "
                            f"(test_list.txt was not in {d.manual_dir})")
        split = splits.official_split(ds.official_test, ds.groups, ds.labels,
                                      validation_fraction=d.fractions[1] / (d.fractions[0] + d.fractions[1]),
                                      seed=seed)
    else:
        raise AssertionError(f"unchecked --data.split={d.split!r}")  # validate.check_options rejects it

    noisy = None
    train_labels = ds.labels
    if d.noise != "none":
        # Only the training rows get noise: validation and test keep the stored labels.
        injected = noise.add_label_noise(ds.labels, mode=d.noise, rate=d.noise_rate, seed=cfg.seed,
                                         num_classes=None if ds.multilabel else len(ds.class_names))
        in_train = np.zeros(len(ds.labels), bool)
        in_train[split["train"]] = True
        where = in_train if not ds.multilabel else in_train[:, None]
        noisy = noise.NoisyLabels(clean=ds.labels, noisy=np.where(where, injected.noisy, ds.labels))
        train_labels = noisy.noisy

    subsets = splits.overlapping_subsets(split["train"], len(cfg.teachers.architectures),
                                         cfg.teachers.overlap if overlap is None else overlap,
                                         seed=cfg.teachers.subset_seed)
    return ExperimentData(dataset=ds, splits=split, train_labels=train_labels, noisy=noisy, subsets=tuple(subsets))


def summary(data: ExperimentData, cfg: ExperimentConfig) -> dict[str, Any]:
    """JSON facts for the report: split sizes, groups shared between splits (must be 0), subsets."""
    ds = data.dataset
    info = splits.split_summary(ds.groups, ds.labels, data.splits)
    return {
        "dataset": cfg.data.dataset,
        "class_names": list(ds.class_names),
        "multilabel": ds.multilabel,
        "examples": len(ds.labels),
        "split_sizes": {name: int(len(idx)) for name, idx in data.splits.items()},
        "group_overlap": splits.shared_groups(ds.groups, data.splits),
        "splits": info,
        "teacher_subsets": [
            {"index": i, "architecture": arch, "size": int(len(rows)),
             "noise_rate": None if data.noisy is None else data.noisy.noise_rate(rows)}
            for i, (arch, rows) in enumerate(zip(cfg.teachers.architectures, data.subsets))],
    }


def augment_config(cfg: ExperimentConfig) -> pipeline.AugmentConfig:
    presets = {"dermoscopy": pipeline.AugmentConfig.dermoscopy, "chest_xray": pipeline.AugmentConfig.chest_xray}
    if cfg.data.augment not in presets:
        raise ValueError(f"--data.augment={cfg.data.augment!r}: expected one of {', '.join(presets)}")
    return presets[cfg.data.augment]()


def train_iterator(data: ExperimentData, cfg: ExperimentConfig, rows: np.ndarray, *, seed: int):
    """Checkpointable iterator of augmented training batches over `rows`, repeated forever."""
    return pipeline.train_iterator(data.dataset.source, rows, data.train_labels, image_size=cfg.data.image_size,
                                   batch_size=cfg.optim.batch_size, seed=seed, augment=augment_config(cfg),
                                   num_workers=cfg.data.num_workers)


def eval_batches(data: ExperimentData, cfg: ExperimentConfig, rows: np.ndarray, *, batch_size: int | None = None):
    """Padded, masked evaluation batches over `rows` with the stored (clean) labels."""
    return pipeline.eval_batches(data.dataset.source, rows, data.dataset.labels, image_size=cfg.data.image_size,
                                 batch_size=batch_size or cfg.data.eval_batch_size)


def steps_per_epoch(cfg: ExperimentConfig, rows: np.ndarray) -> int:
    steps = len(rows) // cfg.optim.batch_size
    if steps == 0:
        raise ValueError(f"{len(rows)} training examples make no full batch of --optim.batch_size="
                         f"{cfg.optim.batch_size}")
    return steps
