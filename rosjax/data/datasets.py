"""The loader API of the experiments: `prepare(name, ...)` -> `PreparedDataset`.

`prepare` builds the TFDS dataset once (idempotent: a prepared dataset is only opened) and
returns a random-access source of the decoded examples plus, as NumPy arrays for all N
examples, the labels, the grouping key of the splits and the per-example metadata. Those
arrays come from `builder.columns()`: read once with the images left encoded and cached
next to the TFDS files, so opening NIH's 112k examples again takes milliseconds.

Several processes may call `prepare` on one data_dir at once (one job per teacher): the
first prepares while holding an exclusive lock on <data_dir>/<name>/.<config>.lock, the
others wait for it and then open its result. A dataset already prepared in a read-only
data_dir opens without writing anything (its column cache is then only skipped).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rosjax.data import csv_images, isic2019, nih_chestxray14
from rosjax.data.errors import DataError

_BUILDERS = {"isic2019": isic2019, "nih_chestxray14": nih_chestxray14, "csv_images": csv_images}
DATASETS = tuple(_BUILDERS)
_SAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "samples"
# --data.download: "auto" downloads public input files missing from the manual directory,
# "never" fails at once naming them.
DOWNLOAD_MODES = ("auto", "never")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset: every example of the one 'train' split, in stored order.

    Row i of every array describes `source[i]`.
    """

    source: Sequence[dict[str, Any]]  # source[i]['image']: uint8 [H, W, C], decoded on read
    labels: np.ndarray          # int32 [N] (ISIC) or float32 [N, C] multi-hot (NIH)
    groups: np.ndarray          # str [N]: lesion id (ISIC) / patient id (NIH), the split key
    class_names: tuple[str, ...]
    multilabel: bool
    num_channels: int
    image_size: int
    official_test: np.ndarray | None  # bool [N]: in NIH's test_list.txt; None without lists
    metadata: dict[str, np.ndarray]   # per-example columns for analyses, each [N] or [N, K]

    def __len__(self) -> int:
        return len(self.labels)


def sample_dir(name: str) -> pathlib.Path:
    """The bundled sample files of `name`, laid out like the real files (a manual_dir)."""
    _check_name(name)
    return _SAMPLES_DIR / name


def prepare(name: str, *, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            image_size: int | None = None, prepare_if_missing: bool = True,
            download: str = "auto", labels: str | Sequence[str] | None = None,
            skip_corrupt_images: bool = False, csv: str | None = None, image_column: str = "",
            label_columns: Sequence[str] = (), label_separator: str = "", group_column: str = "",
            channels: int | None = None) -> PreparedDataset:
    """Prepares (if needed) and opens dataset `name` stored in `data_dir`.

    Args:
      name: 'isic2019' or 'nih_chestxray14'.
      data_dir: the TFDS data directory (prepared data goes to <data_dir>/<name>/<size>/).
      manual_dir: where the input files are (default <data_dir>/downloads/manual/).
      image_size: one of the builder's sizes (32, 64, 96, 128, 224, 256; nih_chestxray14 and
        csv_images also 512); None = 256.
      prepare_if_missing: False only opens an already prepared dataset (DataError if there
        is none); True prepares it first when needed, from manual_dir or by downloading.
      download: 'auto' downloads input files missing from manual_dir (where they have a
        public URL); 'never' fails at once with a DataError naming the missing files and
        manual_dir (no network access).
      labels: NIH only: the findings of the task, in order; None = the 8 ChestX-ray8
        labels, 'all' = all 14. ISIC takes None (its 8 classes).
      skip_corrupt_images: while preparing, leave unreadable images out instead of failing
        (they are listed in the dataset's metadata.json).
      csv, image_column, label_columns, label_separator, group_column, channels: csv_images
        only (see rosjax.data.csv_images): the label table (a path, or a name under
        manual_dir), its columns, and the stored channel count (1 or 3; None = 3). For a
        multi-label table `labels` selects classes (None = all); a one-label one takes None.
    """
    if name == "csv_images":
        return _prepare_csv(data_dir=data_dir, manual_dir=manual_dir, image_size=image_size,
                            prepare_if_missing=prepare_if_missing, labels=labels,
                            skip_corrupt_images=skip_corrupt_images, csv=csv,
                            image_column=image_column, label_columns=label_columns,
                            label_separator=label_separator, group_column=group_column,
                            channels=3 if channels is None else channels)
    module = _BUILDERS[_check_name(name)]
    size = module.DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if size not in module.IMAGE_SIZES:
        raise ValueError(f"{name} has no image_size={image_size}; choose one of "
                         f"{module.IMAGE_SIZES}.")
    if download not in DOWNLOAD_MODES:
        raise ValueError(f"download={download!r}: expected one of {DOWNLOAD_MODES} (to only "
                         "open a prepared dataset pass prepare_if_missing=False).")
    selected = _select_labels(name, labels)

    def make_builder():
        return module.Builder(config=str(size), data_dir=os.fspath(data_dir),
                              file_format="array_record", skip_corrupt_images=skip_corrupt_images,
                              allow_download=download == "auto")

    builder = make_builder()
    if not builder.is_prepared():
        if not prepare_if_missing:
            raise DataError(f"{name} at {size} px is not prepared in {data_dir}; call "
                            "prepare(..., prepare_if_missing=True) to build it.")
        with _preparation_lock(pathlib.Path(data_dir) / name, str(size)):
            builder = make_builder()  # another process may have prepared it meanwhile
            if not builder.is_prepared():
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=None if manual_dir is None else os.fspath(manual_dir),
                    try_download_gcs=False))
    source = builder.as_data_source(split="train")
    columns = builder.columns()
    if name == "isic2019":
        return PreparedDataset(
            source=source, labels=columns["label"].astype(np.int32),
            groups=columns["lesion_id"], class_names=isic2019.CLASS_NAMES, multilabel=False,
            num_channels=3, image_size=size, official_test=None,
            metadata={k: columns[k] for k in ("image_id", "age", "sex", "site")})
    all_labels = columns["labels"]  # uint8 [N, 14]
    index = [nih_chestxray14.LABEL_NAMES.index(x) for x in selected]
    return PreparedDataset(
        source=source, labels=all_labels[:, index].astype(np.float32),
        groups=columns["patient_id"], class_names=selected, multilabel=True,
        num_channels=1, image_size=size,
        official_test=(columns["official_test"].astype(bool)
                       if builder.info.metadata["official_lists"] else None),
        metadata={"all_labels": all_labels,
                  **{k: columns[k] for k in ("image_id", "follow_up", "view_position", "age",
                                             "sex")}})


def _prepare_csv(*, data_dir, manual_dir, image_size, prepare_if_missing, labels,
                 skip_corrupt_images, csv, image_column, label_columns, label_separator,
                 group_column, channels) -> PreparedDataset:
    """`prepare` of csv_images: the config (and its name) comes from the label table."""
    if not csv or not image_column or not label_columns:
        raise DataError("csv_images needs --data.csv, --data.image_column and "
                        "--data.label_columns (see README, 'Your own dataset').")
    config, table = csv_images.csv_config(
        csv=csv, manual_dir=manual_dir, image_column=image_column, label_columns=label_columns,
        label_separator=label_separator, group_column=group_column, channels=channels,
        image_size=csv_images.DEFAULT_IMAGE_SIZE if image_size is None else image_size)
    if table.multilabel:
        selected = table.class_names if not labels or labels == "all" else tuple(labels)
        unknown = [x for x in selected if x not in table.class_names]
        if unknown or len(set(selected)) != len(selected):
            raise DataError(f"--data.labels={','.join(selected)}: unknown {unknown} or repeated; "
                            f"the classes of {table.path} are {list(table.class_names)} (--data.labels=all "
                            "learns every one; experiments.nih_cxr defaults to the 8 ChestX-ray8 "
                            "findings).")
    elif labels:
        raise DataError(f"--data.labels={labels}: {table.path} is a one-label table (classes "
                        f"{list(table.class_names)}); leave --data.labels empty.")

    def make_builder():
        return csv_images.Builder(config=config, data_dir=os.fspath(data_dir),
                                  file_format="array_record", skip_corrupt_images=skip_corrupt_images,
                                  allow_download=False)

    builder = make_builder()
    if not builder.is_prepared():
        if not prepare_if_missing:
            raise DataError(f"csv_images {config.name} ({table.path}) is not prepared in "
                            f"{data_dir}; call prepare(..., prepare_if_missing=True) to build it.")
        with _preparation_lock(pathlib.Path(data_dir) / "csv_images", config.name):
            builder = make_builder()
            if not builder.is_prepared():
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=os.fspath(os.path.expanduser(manual_dir)) if manual_dir else
                    os.fspath(table.path.parent), try_download_gcs=False))
    columns = builder.columns()
    if table.multilabel:
        index = [table.class_names.index(x) for x in selected]
        all_labels = columns["labels"]
        label_array = all_labels[:, index].astype(np.float32)
        class_names = selected
    else:
        label_array, class_names = columns["label"].astype(np.int32), table.class_names
    metadata = {"image_id": columns["image_id"]}
    if table.multilabel:
        metadata["all_labels"] = all_labels
    return PreparedDataset(
        source=builder.as_data_source(split="train"), labels=label_array,
        groups=columns["group_id"], class_names=class_names, multilabel=table.multilabel,
        num_channels=channels, image_size=config.image_size, official_test=None,
        metadata=metadata)


@contextlib.contextmanager
def _preparation_lock(folder: pathlib.Path, config: str) -> Iterator[None]:
    """Holds an exclusive flock on <folder>/.<config>.lock (blocking until it is free).

    A folder that cannot be written is a DataError naming it (preparation writes there).
    """
    path = folder / f".{config}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DataError(
            f"{folder.name} at {config} px is not prepared in {folder.parent} and cannot be "
            f"prepared there: {folder} is not writable ({type(e).__name__}: {e}). Pass a "
            "writable --data.data_dir (or prepare it once where it can be written and copy "
            "the folder).") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process preparing %s (lock %s).", folder, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_name(name: str) -> str:
    if name not in _BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASETS}.")
    return name


def _select_labels(name: str, labels: str | Sequence[str] | None) -> tuple[str, ...]:
    """The task's label names, validated against the dataset's."""
    if name == "isic2019":
        if labels is not None:
            raise ValueError(f"isic2019 is a one-label task over {isic2019.CLASS_NAMES}; "
                             f"labels must be None, not {labels!r}.")
        return isic2019.CLASS_NAMES
    if labels is None:
        return nih_chestxray14.CHESTXRAY8_LABELS
    if labels == "all":
        return nih_chestxray14.LABEL_NAMES
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be None, 'all' or a non-empty list of findings, not "
                         f"{labels!r}.")
    unknown = [x for x in labels if x not in nih_chestxray14.LABEL_NAMES]
    if unknown or len(set(labels)) != len(labels):
        raise ValueError(f"labels {list(labels)}: unknown {unknown} or repeated; choose from "
                         f"{nih_chestxray14.LABEL_NAMES}.")
    return tuple(labels)
