"""Regenerates the bundled sample files of both datasets (`python -m rosjax.data.make_samples`).

The samples copy the real files' names, layouts and CSV formats byte for byte in style
(the README's "Datasets" section describes them) but hold 120 tiny synthetic images each, so the
builders, the splits and a whole smoke experiment run on them in seconds. Each image shows
its labels (a class-specific colour and shape for ISIC, one bright disc per finding at a
finding-specific place for NIH), so a tiny CNN learns the smoke task above chance.

Written under `--out` (default: rosjax/data/samples/, shipped as package data):
  isic2019/                        = a manual_dir
    ISIC_2019_Training_Input.zip   ISIC_2019_Training_Input/{<image>.jpg, ATTRIBUTION.txt,
                                   LICENSE.txt}; 120 JPEGs (64 px, some 80x60 / 72x56),
                                   8 classes x 15, shared lesion ids, ids without a lesion
                                   id, '_downsampled' ids
    ISIC_2019_Training_GroundTruth.csv, ISIC_2019_Training_Metadata.csv   (CRLF, 0.0/1.0)
  nih_chestxray14/                 = a manual_dir
    images_001.tar.gz, images_002.tar.gz   images/<patient>_<nnn>.png, 64x64 L (3 RGBA),
                                   40 patients, split where NIH's archive 001 ends
    Data_Entry_2017_v2020.csv      (LF, plain integers, 'Patient Gender', rows re-ordered)
    train_val_list.txt, test_list.txt      (patient-disjoint, 10 test patients)
  nih_chestxray14_csv_variants/    the same table in the other known formats:
    2017/Data_Entry_2017.csv       (CRLF, header trailing comma, '058Y', zero-padded ids)
    v2020_patient_sex/Data_Entry_2017_v2020.csv   ('Patient Sex', trailing comma everywhere)
    kaggle/Data_Entry_2017.csv     (header trailing comma, plain integers, LF)
Every random draw comes from numpy Generators seeded with SEED, and archive timestamps
are fixed, so a rerun writes the same content.

Generated sets of any size (`generated_sample_dir`, or `--per_class N --difficulty D`): the
same layouts with 8 x N images per dataset (NIH: N x 8 / 3 patients, without the CSV
variants), and with `difficulty` > 0 the class drawn with realistic variation
(rosjax.data.sample_variation), so that a difference between methods can be measured. The
default size and look (15, 0) are the bundled files.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import pathlib
import shutil
import tarfile
import tempfile
import zipfile

import numpy as np
import PIL.Image

from rosjax.data import sample_variation
from rosjax.data.isic2019.csv_files import CLASS_NAMES, UNKNOWN_CLASS
from rosjax.data.nih_chestxray14.csv_files import LABEL_NAMES, NO_FINDING

SAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "samples"
DEFAULT_GENERATED_ROOT = "~/.cache/rosjax/samples"
SEED = 2019
ISIC_DIR, NIH_DIR, NIH_VARIANTS_DIR = "isic2019", "nih_chestxray14", "nih_chestxray14_csv_variants"
_ZIP_TIME = (2019, 5, 1, 0, 0, 0)
_TAR_MTIME = 1506470400  # 2017-09-27, the NIH release

# ------------------------------------------------------------------------------------ ISIC

BUNDLED_PER_CLASS = 15  # the bundled files' size: 8 x 15 images of each dataset
# Class look: lesion colour (RGB) and shape, so the class is visible at 32 px.
_ISIC_LOOK = {
    "MEL": ((45, 25, 25), "disk"), "NV": ((150, 95, 55), "disk"),
    "BCC": ((235, 110, 170), "ring"), "AK": ((205, 40, 40), "square"),
    "BKL": ((120, 120, 50), "square"), "DF": ((100, 60, 150), "ring"),
    "VASC": ((35, 70, 205), "disk"), "SCC": ((240, 225, 70), "square"),
}
_SITES = ("anterior torso", "lower extremity", "head/neck", "upper extremity",
          "posterior torso", "palms/soles", "oral/genital", "lateral torso")
# Images without a lesion id: the old ISIC archive (ids below 16073), classes NV/MEL/BKL only.
_ISIC_NO_LESION = {"NV": 6, "MEL": 5, "BKL": 5}
# Lesion-id sources: (prefix, image-id range, image size (w, h), '_downsampled' suffix).
_ISIC_SOURCES = (("HAM_", (24306, 34321), (80, 60), False),
                 ("BCN_", (53000, 73255), (64, 64), False),
                 ("MSK4_", (10000, 16073), (72, 56), True))


def _isic_image(rng: np.random.Generator, label: str, size: tuple[int, int], difficulty: float) -> bytes:
    """A skin-coloured JPEG with the class's lesion colour and shape near the centre."""
    if difficulty > 0:
        return sample_variation.isic_image(rng, _ISIC_LOOK, label, size, difficulty)
    w, h = size
    skin = np.array([225, 180, 150]) + rng.normal(0, 10, 3)
    img = skin + rng.normal(0, 6, (h, w, 3))  # [H, W, 3]
    colour, shape = _ISIC_LOOK[label]
    m = min(w, h)
    cy, cx = h / 2 + rng.uniform(-0.08, 0.08) * m, w / 2 + rng.uniform(-0.08, 0.08) * m
    r = rng.uniform(0.22, 0.32) * m
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(yy - cy, xx - cx)
    mask = {"disk": dist < r, "ring": (dist < r) & (dist > 0.5 * r),
            "square": np.maximum(abs(yy - cy), abs(xx - cx)) < 0.85 * r}[shape]
    img[mask] = np.array(colour) + rng.normal(0, 10, (mask.sum(), 3))
    out = io.BytesIO()
    PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def _isic_rows(rng: np.random.Generator, per_class: int) -> list[dict]:
    """8 * per_class image rows: label, lesion id ('' for none), metadata and image size."""
    used: set[int] = set()

    def new_id(lo: int, hi: int) -> int:
        while (n := int(rng.integers(lo, hi))) in used:
            pass
        used.add(n)
        return n

    rows = []
    no_lesion = {label: round(count * per_class / BUNDLED_PER_CLASS) for label, count in _ISIC_NO_LESION.items()}
    for label, count in no_lesion.items():
        for _ in range(count):
            rows.append({"num": new_id(0, 16073), "label": label, "lesion": "",
                         "size": (64, 48), "downsampled": rng.random() < 0.25})
    lesion_counter = {prefix: int(rng.integers(100, 900)) for prefix, *_ in _ISIC_SOURCES}
    for label in CLASS_NAMES:
        remaining = per_class - no_lesion.get(label, 0)
        while remaining:
            n_images = min(remaining, int(rng.choice([1, 1, 2, 3])))
            prefix, (lo, hi), size, downsampled = _ISIC_SOURCES[
                int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
            lesion_counter[prefix] += int(rng.integers(1, 40))
            lesion = f"{prefix}{lesion_counter[prefix]:07d}"
            for _ in range(n_images):
                rows.append({"num": new_id(lo, hi), "label": label, "lesion": lesion,
                             "size": size, "downsampled": downsampled})
            remaining -= n_images
    for row in rows:
        row["image"] = f"ISIC_{row['num']:07d}" + ("_downsampled" if row["downsampled"] else "")
        empty = rng.random() < 0.04  # a few rows with every metadata field empty
        row["age"] = "" if empty or rng.random() < 0.05 else str(
            5 * int(np.clip(rng.normal(10, 3.5), 0, 17)))
        row["site"] = "" if empty or rng.random() < 0.1 else _SITES[
            int(rng.choice(8, p=[0.27, 0.2, 0.18, 0.12, 0.11, 0.06, 0.03, 0.03]))]
        row["sex"] = "" if empty or rng.random() < 0.03 else str(
            rng.choice(["male", "female"]))
    return sorted(rows, key=lambda r: r["image"])


def write_isic(out: pathlib.Path, rng: np.random.Generator, per_class: int = BUNDLED_PER_CLASS,
               difficulty: float = 0.0) -> None:
    """The three ISIC 2019 training files with 8 * per_class synthetic images."""
    out.mkdir(parents=True)
    rows = _isic_rows(rng, per_class)
    crlf = "\r\n"
    gt = ["image," + ",".join(CLASS_NAMES + (UNKNOWN_CLASS,))]
    gt += [r["image"] + "," + ",".join("1.0" if c == r["label"] else "0.0"
                                       for c in CLASS_NAMES + (UNKNOWN_CLASS,)) for r in rows]
    (out / "ISIC_2019_Training_GroundTruth.csv").write_bytes((crlf.join(gt) + crlf).encode())
    meta = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    meta += [",".join((r["image"], r["age"], r["site"], r["lesion"], r["sex"])) for r in rows]
    (out / "ISIC_2019_Training_Metadata.csv").write_bytes((crlf.join(meta) + crlf).encode())

    folder = "ISIC_2019_Training_Input/"
    members = [(f"{folder}{r['image']}.jpg", _isic_image(rng, r["label"], r["size"], difficulty))
               for r in rows]
    members = [members[i] for i in rng.permutation(len(members))]  # zip order != CSV order
    members += [(folder + "ATTRIBUTION.txt", b"Sample files generated by rosjax; see "
                 b"https://challenge.isic-archive.com/data/#2019 for the real data.\n"),
                (folder + "LICENSE.txt", b"CC-BY-NC 4.0 (as the ISIC 2019 data).\n")]
    with zipfile.ZipFile(out / "ISIC_2019_Training_Input.zip", "w") as zf:
        info = zipfile.ZipInfo(folder, date_time=_ZIP_TIME)
        info.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(info, b"")
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)

# ------------------------------------------------------------------------------------- NIH

# At the bundled size; a generated set of `per_class` has per_class / 15 times as many patients.
NIH_PATIENTS_PER_ARCHIVE = 20  # 3 images per patient on average
NIH_TEST_FRACTION = 4          # 1 in 4 patients in test_list.txt
_NIH_SPACINGS = {"0.143": "0.14300000000000002", "0.139": "0.139", "0.168": "0.168",
                 "0.194311": "0.19431099999999998"}  # 2017 text -> v2020 text
_NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{sex},"
               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _nih_image(rng: np.random.Generator, labels: tuple[str, ...], rgba: bool, difficulty: float) -> bytes:
    """A 64x64 chest-like PNG with one bright disc per finding, at the finding's place.

    Finding k of LABEL_NAMES sits in cell (k // 4, k % 4) of a 4x4 grid (16-px cells).
    """
    if difficulty > 0:
        pil = sample_variation.nih_image(rng, [LABEL_NAMES.index(x) for x in labels], difficulty)
        return _png(pil.convert("RGBA") if rgba else pil)
    yy, xx = np.mgrid[:64, :64]
    img = 70 + 50 * np.exp(-((xx - 32) / 9.0) ** 2)  # bright spine/mediastinum  [64, 64]
    for cx in (18, 46):  # two darker lungs
        img -= 35 * (((xx - cx) / 12.0) ** 2 + ((yy - 34) / 22.0) ** 2 < 1)
    img = img + rng.normal(0, 4, img.shape)
    for name in labels:
        k = LABEL_NAMES.index(name)
        cy, cx = 8 + 16 * (k // 4) + rng.uniform(-2, 2), 8 + 16 * (k % 4) + rng.uniform(-2, 2)
        img[np.hypot(yy - cy, xx - cx) < 5] = 235
    pil = PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")
    return _png(pil.convert("RGBA") if rgba else pil)


def _png(pil: PIL.Image.Image) -> bytes:
    out = io.BytesIO()
    pil.save(out, "PNG")
    return out.getvalue()


def _nih_rows(rng: np.random.Generator, per_class: int) -> list[dict]:
    """8 * per_class image rows of about per_class * 8 / 3 patients (half per archive), with labels and metadata."""
    per_archive = NIH_PATIENTS_PER_ARCHIVE * per_class // BUNDLED_PER_CLASS
    patients = sorted(rng.choice(np.arange(1, 1335), per_archive, replace=False))
    patients += sorted(rng.choice(np.arange(1336, 3923), per_archive, replace=False))
    images = 8 * per_class
    counts = np.full(len(patients), images // len(patients))
    counts[:images - counts.sum()] += 1
    for _ in range(3 * len(patients) // 4):  # vary the follow-ups per patient, keeping the total
        a, b = rng.choice(len(patients), 2, replace=False)
        if counts[a] > 1 and counts[b] < 6:
            counts[a] -= 1
            counts[b] += 1
    weights = np.array([4.0] * 8 + [1.0] * 6)  # the ChestX-ray8 findings 4x as common
    rows = []
    for pid, count in zip(patients, counts):
        sex, age0, view_p = str(rng.choice(["M", "F"])), int(rng.integers(18, 85)), rng.random()
        for fu in range(count):
            if rng.random() < 0.15:
                labels: tuple[str, ...] = ()
            else:
                k = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
                picked = rng.choice(len(LABEL_NAMES), k, replace=False, p=weights / weights.sum())
                labels = tuple(sorted(LABEL_NAMES[i] for i in picked))
            rows.append({
                "image": f"{pid:08d}_{fu:03d}.png", "pid": int(pid), "fu": fu,
                "labels": labels, "age": age0 + fu // 2, "age_unit": "Y", "sex": sex,
                "view": "PA" if rng.random() < 0.4 + 0.4 * view_p else "AP",
                "w": int(rng.integers(2000, 3056)), "h": int(rng.integers(2000, 3056)),
                "spacing": str(rng.choice(list(_NIH_SPACINGS)))})
    # Two infants, as in the real 2017 table ('011M' months, '004D' days; 0 years in v2020).
    infants, rgba = rng.choice(len(rows), 2, replace=False), rng.choice(len(rows), 3, replace=False)
    for i, (age, unit) in zip(infants, ((11, "M"), (4, "D"))):
        rows[i]["age"], rows[i]["age_unit"] = age, unit
    for i in rgba:
        rows[i]["rgba"] = True
    return rows


def _nih_csv(rows: list[dict], variant: str) -> bytes:
    """The label table in one of the variants '2017', 'v2020', 'v2020_patient_sex', 'kaggle'."""
    padded = variant == "2017"
    header = _NIH_HEADER.format(sex="Patient Sex" if variant == "v2020_patient_sex"
                                else "Patient Gender")
    lines = [header + ("" if variant == "v2020" else ",")]
    for r in rows:
        if padded:
            age = f"{r['age']:03d}{r['age_unit']}"
        else:
            age = str(r["age"] if r["age_unit"] == "Y" else 0)
        spacing = r["spacing"] if variant in ("2017", "kaggle") else _NIH_SPACINGS[r["spacing"]]
        fields = (r["image"], "|".join(r["labels"]) or NO_FINDING,
                  f"{r['fu']:03d}" if padded else str(r["fu"]),
                  f"{r['pid']:08d}" if padded else str(r["pid"]), age, r["sex"], r["view"],
                  str(r["w"]), str(r["h"]), spacing, spacing)
        lines.append(",".join(fields) + ("," if variant == "v2020_patient_sex" else ""))
    eol = "\r\n" if variant == "2017" else "\n"
    return (eol.join(lines) + eol).encode()


def _write_tar_gz(path: pathlib.Path, members: list[tuple[str, bytes]]) -> None:
    """A gzip tar with an 'images/' folder, fixed timestamps and owners."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            info = tarfile.TarInfo("images")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _TAR_MTIME
            tar.addfile(info)
            for name, data in members:
                info = tarfile.TarInfo(f"images/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, _TAR_MTIME
                tar.addfile(info, io.BytesIO(data))


def write_nih(out: pathlib.Path, variants_out: pathlib.Path | None, rng: np.random.Generator,
              per_class: int = BUNDLED_PER_CLASS, difficulty: float = 0.0) -> None:
    """Two image archives, the v2020 label table, the split lists, and (unless variants_out is
    None) the CSV variants; 8 * per_class images."""
    out.mkdir(parents=True)
    rows = _nih_rows(rng, per_class)
    images = {r["image"]: _nih_image(rng, r["labels"], r.get("rgba", False), difficulty) for r in rows}
    names = sorted(images)
    first_002 = next(i for i, n in enumerate(names) if n >= "00001336_000.png")
    _write_tar_gz(out / "images_001.tar.gz", [(n, images[n]) for n in names[:first_002]])
    _write_tar_gz(out / "images_002.tar.gz", [(n, images[n]) for n in names[first_002:]])

    v2020_order = [rows[i] for i in rng.permutation(len(rows))]  # v2020 re-ordered its rows
    (out / "Data_Entry_2017_v2020.csv").write_bytes(_nih_csv(v2020_order, "v2020"))
    files = {"2017/Data_Entry_2017.csv": _nih_csv(rows, "2017"),
             "v2020_patient_sex/Data_Entry_2017_v2020.csv": _nih_csv(v2020_order,
                                                                     "v2020_patient_sex"),
             "kaggle/Data_Entry_2017.csv": _nih_csv(rows, "kaggle")}
    for rel, data in files.items() if variants_out is not None else ():
        (variants_out / rel).parent.mkdir(parents=True, exist_ok=True)
        (variants_out / rel).write_bytes(data)

    patients = sorted({r["pid"] for r in rows})
    test_patients = set(rng.choice(patients, len(patients) // NIH_TEST_FRACTION, replace=False).tolist())
    test = [n for n in names if int(n[:8]) in test_patients]
    train_val = [n for n in names if int(n[:8]) not in test_patients]
    (out / "train_val_list.txt").write_text("".join(n + "\n" for n in train_val))
    (out / "test_list.txt").write_text("".join(n + "\n" for n in test))


# ------------------------------------------------------------------------- generated sets

MAX_PER_CLASS = {ISIC_DIR: 2000, NIH_DIR: 1000}  # the real files' image-id ranges hold no more
MIN_PER_CLASS = {ISIC_DIR: 1, NIH_DIR: 3}        # NIH: at least one test patient per archive


def _rng(dataset: str, per_class: int, difficulty: float) -> np.random.Generator:
    """The Generator of one sample set: the bundled files' seed at the bundled size and look,
    else seeded from SEED and the arguments (same arguments, same bytes)."""
    offset = (ISIC_DIR, NIH_DIR).index(dataset)
    if per_class == BUNDLED_PER_CLASS and difficulty == 0:
        return np.random.default_rng(SEED + offset)
    return np.random.default_rng([SEED + offset, per_class, round(difficulty * 1000)])


def _check_size(dataset: str, per_class: int, difficulty: float) -> None:
    if dataset not in MAX_PER_CLASS:
        raise ValueError(f"no sample generator for dataset {dataset!r}; choose one of {tuple(MAX_PER_CLASS)}")
    if not MIN_PER_CLASS[dataset] <= per_class <= MAX_PER_CLASS[dataset]:
        raise ValueError(f"{dataset}: per_class={per_class} outside "
                         f"[{MIN_PER_CLASS[dataset]}, {MAX_PER_CLASS[dataset]}]")
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty={difficulty} outside [0, 1]")


def write_samples(out: pathlib.Path, dataset: str, per_class: int = BUNDLED_PER_CLASS,
                  difficulty: float = 0.0) -> None:
    """A manual_dir of `dataset` ('isic2019' / 'nih_chestxray14') with 8 * per_class images at `out`
    (NIH: without the CSV variants)."""
    _check_size(dataset, per_class, difficulty)
    rng = _rng(dataset, per_class, difficulty)
    if dataset == ISIC_DIR:
        write_isic(out, rng, per_class, difficulty)
    else:
        write_nih(out, None, rng, per_class, difficulty)


def generated_sample_dir(dataset: str, per_class: int, *, difficulty: float = 0.0,
                         root: str | os.PathLike | None = None) -> pathlib.Path:
    """A generated manual_dir of `dataset` at `per_class` and `difficulty`, written once and reused.

    It lives at <root>/<dataset>-<per_class>[-<difficulty>]/ (root default ~/.cache/rosjax/samples).
    Concurrent callers each write a unique temporary folder and rename it into place; the losers
    of that race delete theirs and use the winner's, so a reader never sees a half-written set.
    """
    _check_size(dataset, per_class, difficulty)
    root = pathlib.Path(os.path.expanduser(root if root is not None else DEFAULT_GENERATED_ROOT))
    final = root / (f"{dataset}-{per_class}" + (f"-{difficulty:g}" if difficulty else ""))
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        write_samples(tmp / "set", dataset, per_class, difficulty)
        os.rename(tmp / "set", final)
    except OSError:
        if not final.is_dir():  # a failure of our own, not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=SAMPLES_DIR,
                        help="folder to write into (its three sample sub-folders are replaced)")
    parser.add_argument("--per_class", type=int, default=BUNDLED_PER_CLASS,
                        help="images per class (NIH: 8 x this images); other than 15, the two datasets' "
                             "manual_dirs only, without the NIH CSV variants")
    parser.add_argument("--difficulty", type=float, default=0.0,
                        help="0 = the bundled look; up to 1 = realistic variation (rosjax.data.sample_variation)")
    args = parser.parse_args(argv)
    out = args.out
    bundled = args.per_class == BUNDLED_PER_CLASS and args.difficulty == 0
    for sub in (ISIC_DIR, NIH_DIR, NIH_VARIANTS_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    write_samples(out / ISIC_DIR, ISIC_DIR, args.per_class, args.difficulty)
    if bundled:
        write_nih(out / NIH_DIR, out / NIH_VARIANTS_DIR, _rng(NIH_DIR, BUNDLED_PER_CLASS, 0.0))
    else:
        write_samples(out / NIH_DIR, NIH_DIR, args.per_class, args.difficulty)
    print(f"wrote sample files under {out}")


if __name__ == "__main__":
    main()
