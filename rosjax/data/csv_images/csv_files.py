"""The parser of a user's label table for the `csv_images` builder.

One row per image. The columns are named by options:
- `image_column`: the image's file name, with or without extension (any folder part is
  dropped: files are found by name anywhere under the manual directory or in its archives);
- `label_columns`: one column of class names (a one-label task; the classes are the sorted
  distinct values), or several columns of 0/1 (multi-label; the classes are the column
  names, in the given order), or, with `label_separator` (e.g. '|'), one column of
  separated findings (multi-label; the classes are the sorted distinct findings, an empty
  cell is no finding);
- `group_column` (optional): the patient/lesion id of the grouped split; an empty cell or no
  column makes the image its own group.
A missing column, a repeated image, an empty image name or class, or a 0/1 column holding
anything else is a DataError naming the file, line and column.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from rosjax.data.errors import DataError
from rosjax.data.input_files import read_csv

# The image file types the builder reads (loose or inside zip/tar archives).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
# Accepted spellings of 0/1 in multi-label 0/1 columns (matched ignoring case).
_FALSE = ("0", "0.0", "false", "no", "")
_TRUE = ("1", "1.0", "true", "yes")


@dataclasses.dataclass(frozen=True)
class CsvRecord:
    """One row: the image name as written (folder part dropped), its labels and group."""

    image_id: str            # the CSV's name, e.g. 'a.png' or 'a'
    label: int               # one-label: index into class_names; multi-label: -1
    labels: tuple[int, ...]  # multi-label: 0/1 per class; one-label: ()
    group: str               # the group id (the image id where there is none)
    line: int                # line of the CSV (for errors)


@dataclasses.dataclass(frozen=True)
class CsvTable:
    path: pathlib.Path
    class_names: tuple[str, ...]
    multilabel: bool
    records: tuple[CsvRecord, ...]


def _column(path, header: list[str], name: str, option: str) -> int:
    if name not in header:
        raise DataError(f"{path} line 1: no column {name!r} (--data.{option}); the columns are "
                        f"{header}.")
    return header.index(name)


def read_table(path: pathlib.Path, *, image_column: str, label_columns: Sequence[str],
               label_separator: str = "", group_column: str = "") -> CsvTable:
    """Reads and checks the whole table (see the module docstring)."""
    header, rows = read_csv(path)
    if not label_columns:
        raise DataError("csv_images: name the label column(s) with --data.label_columns.")
    if label_separator and len(label_columns) != 1:
        raise DataError(f"--data.label_separator={label_separator!r} splits one column of "
                        f"findings; got {len(label_columns)} label columns {list(label_columns)}.")
    if len(set(label_columns)) != len(label_columns):
        raise DataError(f"--data.label_columns={','.join(label_columns)}: a column is named twice.")
    image_col = _column(path, header, image_column, "image_column")
    label_cols = [_column(path, header, c, "label_columns") for c in label_columns]
    group_col = _column(path, header, group_column, "group_column") if group_column else None
    multi_columns = len(label_columns) > 1
    raw: list[tuple[int, str, list[str], str]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))  # spreadsheet exports drop trailing empties
        elif len(row) > len(header) and any(row[len(header):]):
            raise DataError(f"{path} line {line}: {len(row)} fields, expected {len(header)}.")
        name = row[image_col].replace("\\", "/").rsplit("/", 1)[-1]
        where = f"{path} line {line}"
        if not name:
            raise DataError(f"{where}: column {image_column!r} (--data.image_column) is empty.")
        if name in seen:
            raise DataError(f"{where}: image {name} is listed twice (first on line {seen[name]}).")
        seen[name] = line
        group = row[group_col] if group_col is not None else ""
        raw.append((line, name, [row[c] for c in label_cols], group or name))
    if not raw:
        raise DataError(f"{path} has a header but no rows.")

    records = []
    if multi_columns:
        class_names = tuple(label_columns)
        for line, name, values, group in raw:
            hot = []
            for column, value in zip(label_columns, values):
                v = value.lower()
                if v not in _FALSE and v not in _TRUE:
                    raise DataError(f"{path} line {line} (image {name}), column {column!r}: "
                                    f"{value!r} is not 0 or 1 (several --data.label_columns "
                                    "are 0/1 columns, one per class).")
                hot.append(int(v in _TRUE))
            records.append(CsvRecord(name, -1, tuple(hot), group, line))
    elif label_separator:
        split = [(line, name, [x.strip() for x in values[0].split(label_separator) if x.strip()],
                  group) for line, name, values, group in raw]
        class_names = tuple(sorted({x for _, _, found, _ in split for x in found}))
        if not class_names:
            raise DataError(f"{path}: column {label_columns[0]!r} holds no finding in any row.")
        for line, name, found, group in split:
            records.append(CsvRecord(name, -1, tuple(int(c in found) for c in class_names),
                                     group, line))
    else:
        column = label_columns[0]
        for line, name, values, _ in raw:
            if not values[0]:
                raise DataError(f"{path} line {line} (image {name}): column {column!r} is empty; "
                                "every image needs a class (one-label task).")
        class_names = tuple(sorted({values[0] for _, _, values, _ in raw}))
        if len(class_names) < 2:
            raise DataError(f"{path}: column {column!r} holds one class {list(class_names)}; a "
                            "one-label task needs at least two.")
        for line, name, values, group in raw:
            records.append(CsvRecord(name, class_names.index(values[0]), (), group, line))
    return CsvTable(path=pathlib.Path(path), class_names=class_names,
                    multilabel=multi_columns or bool(label_separator), records=tuple(records))


def find_csv(csv: str, manual_dir: str | os.PathLike | None) -> pathlib.Path:
    """The label table: `csv` as given (absolute or relative to the working directory), else
    relative to `manual_dir`, else a file of that name anywhere under `manual_dir`."""
    given = pathlib.Path(os.path.expanduser(csv))
    if given.is_file():
        return given
    if manual_dir is not None:
        root = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
        if (root / given).is_file():
            return root / given
        if root.is_dir():
            found = sorted(root.rglob(given.name), key=lambda p: (len(p.parts), str(p)))
            found = [p for p in found if p.is_file()]
            if found:
                return found[0]
    raise DataError(f"--data.csv={csv}: no such file (looked at {given.resolve()}"
                    + (f" and under --data.manual_dir={manual_dir}" if manual_dir else "")
                    + ").")


def options_hash(csv_bytes: bytes, **options) -> str:
    """12 hex digits over the CSV's bytes and every option that changes the stored data."""
    digest = hashlib.sha256(csv_bytes)
    for key in sorted(options):
        digest.update(f"\0{key}={options[key]!r}".encode())
    return digest.hexdigest()[:12]


def label_array(table: CsvTable) -> np.ndarray:
    """int32 [N] (one-label) or uint8 [N, C] (multi-label) labels of the records."""
    if table.multilabel:
        return np.array([r.labels for r in table.records], np.uint8).reshape(
            len(table.records), len(table.class_names))
    return np.array([r.label for r in table.records], np.int32)
