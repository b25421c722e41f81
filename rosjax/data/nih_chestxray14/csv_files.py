"""Parsers for the NIH ChestX-ray14 label table and the official split lists.

The label table comes in (at least) these variants, all accepted:
- `Data_Entry_2017.csv` (original, 2017): CRLF, a trailing comma in the header only, ages
  like '058Y' (a few '011M' months / '004D' days), zero-padded follow-up and patient ids.
- `Data_Entry_2017_v2020.csv`: plain integers, LF, header `Patient Gender` (the
  torchxrayvision copy) or `Patient Sex` with a trailing comma on every line (the copy
  PyHealth quotes from the NIH Box folder).
- Kaggle's `Data_Entry_2017.csv`: the 2017 content with plain integers.
Columns are found by name; the bracketed `OriginalImage[Width,Height]` headers split on
their comma into four names, which are accepted and ignored. Any other column, a label
outside the 14 findings + 'No Finding', or a malformed value is a DataError naming the
file and line (also a Follow-up # outside 0..2^31-1). Values outside their known sets are
stored as unknown and counted in one logged warning per file and column: an age outside
0..MAX_AGE years (the 2017 table has a few like '414Y') as -1, a sex other than M/F or a
view position other than PA/AP as '' (matched ignoring case).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

import numpy as np

from rosjax.data.errors import DataError
from rosjax.data.input_files import UnknownValues, decode_text, read_csv

log = logging.getLogger(__name__)

# The 14 findings in the order of the NIH papers and CheXNet (the stored multi-hot order).
LABEL_NAMES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
               "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
               "Fibrosis", "Pleural_Thickening", "Hernia")
# The ChestX-ray8 labels (CVPR 2017): the default task.
CHESTXRAY8_LABELS = LABEL_NAMES[:8]
NO_FINDING = "No Finding"
LABEL_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preferred first
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"

_REQUIRED = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
             "View Position")
_SEX_COLUMNS = ("Patient Gender", "Patient Sex")
_IGNORED = ("OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")
_IMAGE_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")
_AGE = re.compile(r"^(\d+)([YMD]?)$", re.IGNORECASE)
_DAYS_PER_UNIT = {"": 365, "Y": 365, "M": 30, "D": 1}
SEXES = ("M", "F")
VIEW_POSITIONS = ("PA", "AP")
MAX_AGE = 150  # years; ages above are stored as unknown (-1)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class NihRecord:
    """One row of the label table."""

    image_id: str               # file name, e.g. '00000001_000.png'
    labels: tuple[str, ...]     # findings among LABEL_NAMES; () for 'No Finding'
    follow_up: int
    patient_id: str             # 8 digits, zero-padded
    age: int                    # years (month/day ages of infants round down to 0); -1 unknown
    sex: str                    # 'M' / 'F'; '' unknown
    view_position: str          # 'PA' / 'AP'; '' unknown


def multi_hot(labels: tuple[str, ...]) -> np.ndarray:
    """The fixed 14-long 0/1 vector of `labels` in LABEL_NAMES order."""
    out = np.zeros(len(LABEL_NAMES), np.uint8)  # [14]
    out[[LABEL_NAMES.index(name) for name in labels]] = 1
    return out


def read_label_csv(path: pathlib.Path) -> list[NihRecord]:
    """Parses any variant of the label table into records, in file order."""
    header, rows = read_csv(path)
    sex_columns = [c for c in _SEX_COLUMNS if c in header]
    unknown = [c for c in header if c not in _REQUIRED + _SEX_COLUMNS + _IGNORED]
    missing = [c for c in _REQUIRED if c not in header]
    if unknown or missing or len(sex_columns) != 1 or len(set(header)) != len(header):
        raise DataError(
            f"{path} line 1: unknown column layout {header} (unknown {unknown}, missing "
            f"{missing + ([] if len(sex_columns) == 1 else ['Patient Gender or Patient Sex'])}"
            f"); expected the NIH Data_Entry_2017 columns {list(_REQUIRED)} plus "
            "'Patient Gender' or 'Patient Sex'.")
    col = {name: header.index(name) for name in _REQUIRED}
    sex_col = header.index(sex_columns[0])
    records: list[NihRecord] = []
    seen: set[str] = set()
    sexes = UnknownValues(path, header[sex_col], SEXES)
    views = UnknownValues(path, "View Position", VIEW_POSITIONS)
    bad_ages: list[tuple[int, str]] = []
    for line, row in rows:
        while len(row) > len(header) and not row[-1]:
            row.pop()  # the trailing comma of some variants
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, expected {len(header)}.")
        image = row[col["Image Index"]]
        where = f"{path} line {line} (image {image})"
        name_match = _IMAGE_NAME.match(image)
        if not name_match:
            raise DataError(f"{where}: Image Index is not a file name like 00000001_000.png.")
        if image in seen:
            raise DataError(f"{where}: the image is listed twice.")
        seen.add(image)
        findings = tuple(x.strip() for x in row[col["Finding Labels"]].split("|"))
        bad = [x for x in findings if x not in LABEL_NAMES and x != NO_FINDING]
        if bad:
            raise DataError(f"{where}: label {bad} is not one of the 14 findings "
                            f"{LABEL_NAMES} or '{NO_FINDING}'.")
        labels = tuple(sorted({x for x in findings if x != NO_FINDING}, key=LABEL_NAMES.index))
        age = _AGE.match(row[col["Patient Age"]])
        try:
            follow_up = int(row[col["Follow-up #"]])
            patient = int(row[col["Patient ID"]])
        except ValueError:
            raise DataError(f"{where}: Follow-up # {row[col['Follow-up #']]!r} or Patient ID "
                            f"{row[col['Patient ID']]!r} is not an integer.") from None
        if age is None:
            raise DataError(f"{where}: Patient Age {row[col['Patient Age']]!r} is neither an "
                            "integer nor like '058Y' / '011M' / '004D'.")
        if patient != int(name_match.group(1)):
            raise DataError(f"{where}: Patient ID {patient} does not match the image name.")
        if not 0 <= follow_up <= _INT32_MAX:
            raise DataError(f"{where}: Follow-up # {follow_up} is outside 0..{_INT32_MAX}.")
        years = int(age.group(1)) * _DAYS_PER_UNIT[age.group(2).upper()] // 365
        if years > MAX_AGE:
            bad_ages.append((line, row[col["Patient Age"]]))
            years = -1
        records.append(NihRecord(
            image_id=image, labels=labels, follow_up=follow_up, patient_id=f"{patient:08d}",
            age=years, sex=sexes.get(row[sex_col], line),
            view_position=views.get(row[col["View Position"]], line)))
    if not records:
        raise DataError(f"{path} has a header but no rows.")
    if bad_ages:
        log.warning("%s: %d rows have a Patient Age above %d years (%s); stored as unknown "
                    "(-1).", path, len(bad_ages), MAX_AGE,
                    ", ".join(f"line {n}: {v!r}" for n, v in bad_ages[:5]))
    sexes.log()
    views.log()
    return records


def read_image_list(path: pathlib.Path) -> set[str]:
    """The image names of train_val_list.txt / test_list.txt (one per line)."""
    names = set()
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}).") from e
    for line, text in enumerate(decode_text(raw, path).split("\n"), start=1):
        name = text.strip()
        if not name:
            continue
        if not _IMAGE_NAME.match(name):
            raise DataError(f"{path} line {line}: {name!r} is not an image name like "
                            "00000001_000.png.")
        names.add(name)
    return names
