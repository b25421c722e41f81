"""Parsers for the two ISIC 2019 training CSV files.

`ISIC_2019_Training_GroundTruth.csv`: `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`, one-hot
rows of '0.0'/'1.0' strings (re-saved copies with '0'/'1' also parse), CRLF line endings,
the UNK column always 0. `ISIC_2019_Training_Metadata.csv`:
`image,age_approx,anatom_site_general,lesion_id,sex`, every field but `image` may be empty.
Both list the same 25,331 images. Anything else is a DataError naming the file and line,
except metadata values outside their known sets, which are stored as unknown and counted in
one logged warning per file and column: an age_approx outside 0..MAX_AGE years (-1), a sex
other than male/female or a site outside SITES (''; matched ignoring case).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

from rosjax.data.errors import DataError
from rosjax.data.input_files import UnknownValues, read_csv

log = logging.getLogger(__name__)

# The eight training classes in the challenge's column order (= the stored label index).
CLASS_NAMES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
# The test-time "unknown" class: a column of the ground truth, never set in training data.
UNKNOWN_CLASS = "UNK"
METADATA_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
# The known metadata values (the 2019 release's); anything else is stored as unknown ('').
SEXES = ("male", "female")
SITES = ("anterior torso", "head/neck", "lateral torso", "lower extremity", "oral/genital",
         "palms/soles", "posterior torso", "upper extremity")
MAX_AGE = 150  # years; ages outside 0..MAX_AGE are stored as unknown (-1)


@dataclasses.dataclass(frozen=True)
class IsicRecord:
    """One training image: its class and the metadata used for grouping and analyses."""

    image_id: str
    label: int      # index into CLASS_NAMES
    lesion_id: str  # the image id when the metadata gives none (each such image its own group)
    age: int        # approximate age in years; -1 when unknown
    site: str       # anatom_site_general; '' when unknown
    sex: str        # 'male' / 'female'; '' when unknown


def read_ground_truth(path: pathlib.Path) -> dict[str, int]:
    """Maps image id -> class index (CLASS_NAMES), in file order."""
    header, rows = read_csv(path)
    columns = header[1:]
    known = set(CLASS_NAMES) | {UNKNOWN_CLASS}
    if (not header or header[0] != "image" or not set(CLASS_NAMES) <= set(columns)
            or not set(columns) <= known or len(set(columns)) != len(columns)):
        raise DataError(
            f"{path} line 1: unknown column layout {header}; expected "
            f"image,{','.join(CLASS_NAMES)},{UNKNOWN_CLASS} (the ISIC 2019 ground truth).")
    labels: dict[str, int] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, expected {len(header)}.")
        image = row[0]
        where = f"{path} line {line} (image {image})"
        try:
            values = [float(x) for x in row[1:]]
        except ValueError:
            raise DataError(f"{where}: values {row[1:]} are not numbers 0.0/1.0.") from None
        if any(v not in (0.0, 1.0) for v in values):
            raise DataError(f"{where}: values {row[1:]} are not all 0.0 or 1.0.")
        positive = [c for c, v in zip(columns, values) if v == 1.0]
        if UNKNOWN_CLASS in positive:
            raise DataError(f"{where}: label {UNKNOWN_CLASS} is outside the 8 training "
                            f"classes {CLASS_NAMES}.")
        if len(positive) != 1:
            what = "no label" if not positive else f"{len(positive)} labels {positive}"
            raise DataError(f"{where} has {what}; every image needs exactly one class.")
        if image in labels:
            raise DataError(f"{where}: image {image} is listed twice.")
        labels[image] = CLASS_NAMES.index(positive[0])
    if not labels:
        raise DataError(f"{path} has a header but no rows.")
    return labels


def read_metadata(path: pathlib.Path) -> dict[str, tuple[str, int, str, str]]:
    """Maps image id -> (lesion_id or '', age or -1, site, sex), in file order."""
    header, rows = read_csv(path)
    if sorted(header) != sorted(METADATA_COLUMNS):
        raise DataError(f"{path} line 1: unknown column layout {header}; expected the "
                        f"columns {','.join(METADATA_COLUMNS)} (the ISIC 2019 metadata).")
    col = {name: header.index(name) for name in METADATA_COLUMNS}
    sexes = UnknownValues(path, "sex", SEXES)
    sites = UnknownValues(path, "anatom_site_general", SITES)
    bad_ages: list[tuple[int, str]] = []
    out: dict[str, tuple[str, int, str, str]] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, expected {len(header)}.")
        image, age_text = row[col["image"]], row[col["age_approx"]]
        try:
            value = float(age_text) if age_text else -1.0
        except ValueError:
            value = math.nan
        if math.isnan(value):
            raise DataError(f"{path} line {line} (image {image}): age_approx "
                            f"{age_text!r} is not a number.")
        age = -1
        if age_text:
            if 0 <= value <= MAX_AGE:
                age = int(value)
            else:
                bad_ages.append((line, age_text))
        if image in out:
            raise DataError(f"{path} line {line}: image {image} is listed twice.")
        out[image] = (row[col["lesion_id"]], age, sites.get(row[col["anatom_site_general"]], line),
                      sexes.get(row[col["sex"]], line))
    if bad_ages:
        log.warning("%s: %d rows have an age_approx outside 0..%d (%s); stored as unknown (-1).",
                    path, len(bad_ages), MAX_AGE,
                    ", ".join(f"line {n}: {v!r}" for n, v in bad_ages[:5]))
    sexes.log()
    sites.log()
    return out


def read_records(ground_truth: pathlib.Path, metadata: pathlib.Path) -> list[IsicRecord]:
    """Joins the two files by image id, in ground-truth order; both must list the same ids."""
    labels = read_ground_truth(ground_truth)
    meta = read_metadata(metadata)
    for a, b, path_b in ((labels, meta, metadata), (meta, labels, ground_truth)):
        missing = [image for image in a if image not in b]
        if missing:
            raise DataError(f"{len(missing)} images are missing from {path_b}, e.g. "
                            f"{missing[:5]}; the ground truth and metadata files must list "
                            "the same images (are they from the same ISIC 2019 release?).")
    records = []
    for image, label in labels.items():
        lesion_id, age, site, sex = meta[image]
        records.append(IsicRecord(image_id=image, label=label, lesion_id=lesion_id or image,
                                  age=age, site=site, sex=sex))
    return records
