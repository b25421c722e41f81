"""The data stage: prepared dataset → grouped split → (noisy) training labels → teacher subsets.

Everything here is recomputed from seeds on every run (it takes milliseconds: no image is
decoded), so the split and the subsets of a resumed or re-run experiment are the ones it
trained on; `summary()` records them for the report, and `write_split()` writes them as data
(WORKDIR/data/split.json: the image ids of every split and teacher subset and the injected-noise
rows). `--data.split_file` reads such a file (or a folder of train/validation/test.txt id
lists) back instead of computing the split: `read_split_file()`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rosjax import atomic
from rosjax.config import ExperimentConfig
from rosjax.data import DataError, datasets, device_augment, noise, pipeline, splits
from rosjax.data import views as views_lib
from rosjax.data.input_files import decode_text


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """What every training and evaluation stage reads."""
    dataset: datasets.PreparedDataset
    splits: dict[str, np.ndarray]          # train / validation / test source rows
    train_labels: np.ndarray               # [N] or [N, C] labels used for training (noisy if injected)
    eval_labels: np.ndarray                # [N] or [N, C] labels of evaluation batches: the stored ones, but
    #                                        noisy on validation rows with --data.noise_validation (test: stored)
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
    manual_dir = d.manual_dir and os.path.expanduser(d.manual_dir)
    extra = {}
    if d.dataset == "csv_images":
        if manual_dir and pathlib.Path(manual_dir).resolve().is_relative_to(datasets._SAMPLES_DIR):
            manual_dir = None  # --smoke's bundled samples (of another dataset): the CSV's folder
        extra = dict(csv=d.csv, image_column=d.image_column, label_columns=d.label_columns,
                     label_separator=d.label_separator, group_column=d.group_column,
                     channels=d.channels)
    labels = None if not d.labels else "all" if d.labels == ("all",) else d.labels
    ds = datasets.prepare(d.dataset, data_dir=os.path.expanduser(d.data_dir), manual_dir=manual_dir,
                          image_size=d.stored_size, labels=labels,
                          download=d.download, skip_corrupt_images=d.skip_corrupt_images, **extra)
    seed = d.split_seed if split_seed is None else split_seed
    kept = kept_rows(ds, cfg)  # the chest X-ray protocol options; all rows otherwise
    if d.split_file:
        split = split_from_ids(read_split_file(d.split_file), ds, where=d.split_file)
        if len(kept) < len(ds):
            split = {n: np.intersect1d(rows, kept) for n, rows in split.items()}
    elif d.split == "grouped":
        inner = splits.grouped_split(ds.groups[kept], ds.labels[kept], fractions=d.fractions, seed=seed)
        split = {n: kept[rows] for n, rows in inner.items()}
    elif d.split == "official":
        if ds.official_test is None:
            raise DataError(f"--data.split=official: the prepared {d.dataset} has no official test list "
                            f"(test_list.txt was not in {d.manual_dir})")
        inner = splits.official_split(ds.official_test[kept], ds.groups[kept], ds.labels[kept],
                                      validation_fraction=d.fractions[1] / (d.fractions[0] + d.fractions[1]),
                                      seed=seed)
        split = {n: kept[rows] for n, rows in inner.items()}
    else:
        raise AssertionError(f"unchecked --data.split={d.split!r}")  # validate.check_options rejects it

    noisy = None
    train_labels = eval_labels = ds.labels
    if d.noise != "none":
        # The training rows get noise, and with --data.noise_validation the validation rows the same
        # (a user with noisy training labels has noisy validation labels too); test keeps the stored
        # labels. One draw for every row, so the training labels are the same either way.
        injected = noise.add_label_noise(ds.labels, mode=d.noise, rate=d.noise_rate, seed=cfg.seed,
                                         num_classes=None if ds.multilabel else len(ds.class_names))
        noisy_rows = np.zeros(len(ds.labels), bool)
        noisy_rows[split["train"]] = True
        if d.noise_validation:
            noisy_rows[split["validation"]] = True
        where = noisy_rows if not ds.multilabel else noisy_rows[:, None]
        noisy = noise.NoisyLabels(clean=ds.labels, noisy=np.where(where, injected.noisy, ds.labels))
        train_labels = noisy.noisy
        if d.noise_validation:
            eval_labels = noisy.noisy

    subsets = splits.overlapping_subsets(split["train"], len(cfg.teachers.architectures),
                                         cfg.teachers.overlap if overlap is None else overlap,
                                         seed=cfg.teachers.subset_seed)
    return ExperimentData(dataset=ds, splits=split, train_labels=train_labels, eval_labels=eval_labels, noisy=noisy,
                          subsets=tuple(subsets))


def kept_rows(ds: datasets.PreparedDataset, cfg: ExperimentConfig) -> np.ndarray:
    """Sorted rows the splits draw from: all, or (NIH) those of --data.views and, with
    --data.one_image_per_patient, each patient's first image (lowest follow-up number, then
    the lowest image id). Rows left out are in no split."""
    d = cfg.data
    keep = np.ones(len(ds), bool)
    if d.views != "both":
        keep &= np.asarray(ds.metadata["view_position"]) == d.views
    if d.one_image_per_patient:
        rows = np.flatnonzero(keep)
        order = rows[np.lexsort((np.asarray(ds.metadata["image_id"])[rows],
                                 np.asarray(ds.metadata["follow_up"])[rows], ds.groups[rows]))]
        first = np.ones(len(order), bool)
        first[1:] = ds.groups[order][1:] != ds.groups[order][:-1]
        keep = np.zeros(len(ds), bool)
        keep[order[first]] = True
    if not keep.any():
        raise DataError(f"--data.views={d.views}: no image of {d.dataset} has that view position.")
    return np.flatnonzero(keep).astype(np.int64)


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
        # The measured fraction of changed labels per split (None: no injected noise).
        "noise": None if data.noisy is None else {
            "mode": cfg.data.noise, "rate": cfg.data.noise_rate, "validation": cfg.data.noise_validation,
            "measured": {name: data.noisy.noise_rate(rows) for name, rows in data.splits.items()}},
    }


SPLIT_FILE_FORMAT = "rosjax-split/1"
SPLIT_LIST_FILES = {name: f"{name}.txt" for name in splits.SPLIT_NAMES}


def _label_value(ds: datasets.PreparedDataset, label) -> Any:
    """A label as JSON: the class name (one-label) or the list of positive classes."""
    if ds.multilabel:
        return [c for c, v in zip(ds.class_names, label) if v]
    return ds.class_names[int(label)]


def write_split(data: ExperimentData, cfg: ExperimentConfig, path: str | os.PathLike) -> dict[str, Any]:
    """Writes the split as data to `path` (WORKDIR/data/split.json) and returns it.

    Keys: `splits` (image ids of train/validation/test, the part `--data.split_file` reads
    back), `teacher_subsets` (image ids of each teacher's subset), `noise` (None, or the
    training rows, and with --data.noise_validation the validation rows, whose injected label
    differs from the stored one: image id, clean and noisy label as class names), and the options they were made with.
    """
    ds = data.dataset
    ids = np.asarray(ds.metadata["image_id"]).astype(str)
    d = cfg.data
    noise_rows = None
    if data.noisy is not None:
        changed = data.noisy.changed()
        changed = changed.any(axis=1) if changed.ndim == 2 else changed
        noise_rows = {"mode": d.noise, "rate": d.noise_rate, "seed": cfg.seed, "validation": d.noise_validation,
                      "rows": [{"image_id": str(ids[i]), "clean": _label_value(ds, data.noisy.clean[i]),
                                "noisy": _label_value(ds, data.noisy.noisy[i])}
                               for i in np.flatnonzero(changed)]}
    out = {
        "format": SPLIT_FILE_FORMAT,
        "dataset": d.dataset,
        "examples": len(ds),
        "made_with": {"split": d.split, "split_file": d.split_file, "split_seed": d.split_seed,
                      "fractions": list(d.fractions), "overlap": cfg.teachers.overlap,
                      "subset_seed": cfg.teachers.subset_seed},
        "splits": {name: ids[rows].tolist() for name, rows in data.splits.items()},
        "teacher_subsets": [{"index": i, "architecture": arch, "image_ids": ids[rows].tolist()}
                            for i, (arch, rows) in enumerate(zip(cfg.teachers.architectures, data.subsets))],
        "noise": noise_rows,
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(out, indent=1) + "\n")
    return out


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """The image ids of train/validation/test from a split file (`--data.split_file`).

    Either a JSON file with a "splits" object (what `write_split` writes) or with the three
    lists at top level, or a folder holding train.txt, validation.txt and test.txt with one
    image id per line (blank lines and lines starting with '#' are skipped).
    """
    path = pathlib.Path(os.path.expanduser(os.fspath(path)))
    option = f"--data.split_file={path}"
    if path.is_dir():
        missing = [f for f in SPLIT_LIST_FILES.values() if not (path / f).is_file()]
        if missing:
            raise DataError(f"{option}: the folder lacks {', '.join(missing)}; a split folder holds "
                            f"{', '.join(SPLIT_LIST_FILES.values())} with one image id per line.")
        out = {}
        for name, file in SPLIT_LIST_FILES.items():
            text = decode_text((path / file).read_bytes(), path / file)
            out[name] = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
        return out
    if not path.is_file():
        raise DataError(f"{option}: no such file or folder.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{option}: not a JSON split file ({e}); give a split.json or a folder of "
                        f"{', '.join(SPLIT_LIST_FILES.values())}.") from None
    lists = content.get("splits", content) if isinstance(content, dict) else None
    if not isinstance(lists, dict) or not all(
            isinstance(lists.get(n), list) and all(isinstance(x, str) for x in lists[n])
            for n in splits.SPLIT_NAMES):
        raise DataError(f"{option}: expected a JSON object with lists of image ids "
                        f"{', '.join(map(repr, splits.SPLIT_NAMES))} (under \"splits\" or at top level).")
    return {n: [x.strip() for x in lists[n]] for n in splits.SPLIT_NAMES}


def split_from_ids(ids_by_split: dict[str, Sequence[str]], ds: datasets.PreparedDataset, *,
                   where: str) -> dict[str, np.ndarray]:
    """Rows of each split from image ids; DataError naming the first offenders for ids that are
    not in the dataset, ids listed twice (in one or two splits), groups in two splits or an
    empty training split. Images in no list are left out of every split."""
    option = f"--data.split_file={where}"
    image_ids = np.asarray(ds.metadata["image_id"]).astype(str).tolist()
    row_of = {x: i for i, x in enumerate(image_ids)}
    unknown = [(n, x) for n, xs in ids_by_split.items() for x in xs if x not in row_of]
    if unknown:
        raise DataError(f"{option}: {len(unknown)} ids are not images of the prepared dataset "
                        f"({len(image_ids)} images), e.g. "
                        + ", ".join(f"{x!r} ({n})" for n, x in unknown[:5]) + ".")
    first: dict[str, str] = {}
    twice = []
    for name, xs in ids_by_split.items():
        for x in xs:
            if x in first:
                twice.append((x, first[x], name))
            else:
                first[x] = name
    if twice:
        raise DataError(f"{option}: {len(twice)} ids are listed twice, e.g. "
                        + ", ".join(f"{x!r} ({a} and {b})" for x, a, b in twice[:5])
                        + "; every image goes to at most one split.")
    rows = {n: np.sort(np.array([row_of[x] for x in ids_by_split[n]], np.int64)).reshape(-1)
            for n in splits.SPLIT_NAMES}
    owner: dict[str, tuple[str, str]] = {}
    shared = []
    for name in splits.SPLIT_NAMES:
        for r in rows[name]:
            group = str(ds.groups[r])
            if group in owner and owner[group][0] != name:
                if not any(g == group for g, *_ in shared):
                    shared.append((group, owner[group], (name, image_ids[r])))
            else:
                owner.setdefault(group, (name, image_ids[r]))
    if shared:
        raise DataError(f"{option}: {len(shared)} groups (patients/lesions) are in two splits, e.g. "
                        + ", ".join(f"group {g!r} (image {a[1]!r} in {a[0]}, {b[1]!r} in {b[0]})"
                                    for g, a, b in shared[:5])
                        + "; all images of a group must be in one split (a leak otherwise).")
    if len(rows["train"]) == 0:
        raise DataError(f"{option}: the training split is empty.")
    return rows


def augment_config(cfg: ExperimentConfig) -> views_lib.AugmentConfig:
    presets = {"dermoscopy": views_lib.AugmentConfig.dermoscopy, "chest_xray": views_lib.AugmentConfig.chest_xray}
    if cfg.data.augment not in presets:
        raise ValueError(f"--data.augment={cfg.data.augment!r}: expected one of {', '.join(presets)}")
    return presets[cfg.data.augment]()


def augment_on(cfg: ExperimentConfig) -> str:
    """Where this run renders its views: --data.augment_on, with "auto" resolved for this backend
    (the jitted steps on an accelerator, PIL on a CPU, where in-program rendering only adds compile time)."""
    if cfg.data.augment_on != "auto":
        return cfg.data.augment_on
    return "host" if jax.default_backend() == "cpu" else "device"


def train_iterator(data: ExperimentData, cfg: ExperimentConfig, rows: np.ndarray, *, seed: int):
    """Checkpointable iterator of augmented training batches over `rows`, repeated forever."""
    return pipeline.train_iterator(data.dataset.source, rows, data.train_labels, image_size=cfg.data.image_size,
                                   batch_size=cfg.optim.batch_size, seed=seed, augment=augment_config(cfg),
                                   num_workers=cfg.data.num_workers, augment_on=augment_on(cfg))


def eval_batches(data: ExperimentData, cfg: ExperimentConfig, rows: np.ndarray, *, batch_size: int | None = None,
                 rendered: bool = False):
    """Padded, masked evaluation batches over `rows` with `data.eval_labels` (the stored labels; noisy on
    validation rows with --data.noise_validation).

    As shipped (`--data.augment_on`; the eval step renders them), or with `rendered` always with
    float32 [B, S, S, C] images in [0, 1], for code that takes pixels (attacks, loss landscapes).
    """
    batches = pipeline.eval_batches(data.dataset.source, rows, data.eval_labels, image_size=cfg.data.image_size,
                                    batch_size=batch_size or cfg.data.eval_batch_size, augment_on=augment_on(cfg))
    return map(device_augment.rendered, batches) if rendered else batches


def steps_per_epoch(cfg: ExperimentConfig, rows: np.ndarray) -> int:
    steps = len(rows) // cfg.optim.batch_size
    if steps == 0:
        raise ValueError(f"{len(rows)} training examples make no full batch of --optim.batch_size="
                         f"{cfg.optim.batch_size}")
    return steps
