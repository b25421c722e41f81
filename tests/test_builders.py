"""The ISIC 2019 and NIH ChestX-ray14 TFDS builders, their sample files and `prepare()`.

Every builder runs without TensorFlow on the bundled sample files (tiny 32-px configs). The
expected values come from the CSV files read here with the `csv` module, independently of
the builders' parsers.
"""
import csv
import dataclasses
import hashlib
import io
import re
import shutil
import sys
import tarfile
import zipfile
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from rosjax import data
from rosjax.data import CorruptImageError, DataError, downloads, isic2019, make_samples, nih_chestxray14
from rosjax.data.nih_chestxray14 import nih_chestxray14_dataset_builder as nih_builder_module

ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                "Pleural_Thickening", "Hernia"]
ISIC_DIR = data.sample_dir("isic2019")
NIH_DIR = data.sample_dir("nih_chestxray14")
NIH_VARIANTS = NIH_DIR.parent / "nih_chestxray14_csv_variants"
GT, META = "ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"
NIH_CSV = "Data_Entry_2017_v2020.csv"


# ----------------------------------------------------------------- independent references

def isic_reference(folder):
    """image -> (class index, lesion id or the image id), read with the csv module."""
    with open(folder / GT, newline="") as f:
        gt = list(csv.reader(f))
    with open(folder / META, newline="") as f:
        meta = {r["image"]: r for r in csv.DictReader(f)}
    out = {}
    for row in gt[1:]:
        label = ISIC_CLASSES.index(gt[0][row.index("1.0")])
        out[row[0]] = (label, meta[row[0]]["lesion_id"] or row[0])
    return out


def nih_reference(path):
    """image -> dict of the label table's values, read with the csv module."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    out = {}
    for r in rows[1:]:
        found = set(r[1].split("|")) - {"No Finding"}
        age = r[4]
        years = int(age[:-1]) if age[-1:] == "Y" else (0 if age[-1:] in "MD" else int(age))
        out[r[0]] = {"labels": np.array([n in found for n in NIH_FINDINGS], np.float32),
                     "follow_up": int(r[2]), "patient": f"{int(r[3]):08d}", "age": years,
                     "sex": r[5], "view": r[6]}
    return out


def read_list(path):
    return {line.strip() for line in open(path) if line.strip()}


def prepare_tmp(tmp_path, manual_dir, name="isic2019", **kwargs):
    return data.prepare(name, data_dir=tmp_path / "tfds", manual_dir=manual_dir,
                        image_size=32, **kwargs)


def isic_subset(dst, layout, k=16):
    """A manual dir with the first k sample images in the given layout."""
    dst.mkdir(parents=True)
    for name in (GT, META):
        lines = (ISIC_DIR / name).read_bytes().split(b"\r\n")
        (dst / name).write_bytes(b"\r\n".join(lines[:k + 1]) + b"\r\n")
    images = list(isic_reference(dst))
    if layout == "zip":
        shutil.copy(ISIC_DIR / "ISIC_2019_Training_Input.zip", dst)
        return images
    nested = dst / "ISIC_2019_Training_Input"
    folder = {"flat": dst, "nested": nested,
              "double_nested": nested / "ISIC_2019_Training_Input"}[layout]
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(ISIC_DIR / "ISIC_2019_Training_Input.zip") as zf:
        for image in images:
            (folder / f"{image}.jpg").write_bytes(zf.read(f"ISIC_2019_Training_Input/{image}.jpg"))
    return images


def nih_pngs():
    """name -> PNG bytes of every sample image."""
    out = {}
    for archive in ("images_001.tar.gz", "images_002.tar.gz"):
        with tarfile.open(NIH_DIR / archive) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    out[m.name.split("/")[-1]] = tar.extractfile(m).read()
    return out


def nih_subset(dst, k=10, csv_source=NIH_DIR / NIH_CSV):
    """A manual dir with the first k rows of a label table and their PNGs in images/."""
    (dst / "images").mkdir(parents=True)
    lines = csv_source.read_bytes().splitlines(keepends=True)
    (dst / NIH_CSV).write_bytes(b"".join(lines[:k + 1]))
    pngs = nih_pngs()
    names = list(nih_reference(dst / NIH_CSV))
    for name in names:
        (dst / "images" / name).write_bytes(pngs[name])
    return names


# ------------------------------------------------------------------------------------ ISIC

@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isic")
    return tmp, data.prepare("isic2019", data_dir=tmp, manual_dir=ISIC_DIR, image_size=32)


def test_isic_labels_groups_metadata_equal_csv(isic):
    _, ds = isic
    ref = isic_reference(ISIC_DIR)
    assert len(ds) == len(ref) == 120
    ids = ds.metadata["image_id"]
    assert sorted(ids) == sorted(ref)
    np.testing.assert_array_equal(ds.labels, [ref[i][0] for i in ids])
    np.testing.assert_array_equal(ds.groups, [ref[i][1] for i in ids])
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (120,)
    assert ds.class_names == tuple(ISIC_CLASSES) and not ds.multilabel
    assert (ds.num_channels, ds.image_size, ds.official_test) == (3, 32, None)
    with open(ISIC_DIR / META, newline="") as f:
        meta = {r["image"]: r for r in csv.DictReader(f)}
    np.testing.assert_array_equal(ds.metadata["age"],
                                  [int(meta[i]["age_approx"] or -1) for i in ids])
    np.testing.assert_array_equal(ds.metadata["sex"], [meta[i]["sex"] for i in ids])
    np.testing.assert_array_equal(ds.metadata["site"],
                                  [meta[i]["anatom_site_general"] for i in ids])


def test_isic_samples_have_the_documented_structure():
    ref = isic_reference(ISIC_DIR)
    labels = np.array([v[0] for v in ref.values()])
    assert np.bincount(labels, minlength=8).min() >= 10  # every class several times
    lesions = [v[1] for k, v in ref.items() if v[1] != k]
    assert len(lesions) > len(set(lesions))  # some lesions have several images
    assert sum(v[1] == k for k, v in ref.items()) >= 10  # images without a lesion id
    assert sum(k.endswith("_downsampled") for k in ref) >= 2
    assert (ISIC_DIR / GT).read_bytes().count(b"\r\n") == 121  # CRLF, header + 120 rows


def test_isic_source_images_match_arrays_and_originals(isic):
    _, ds = isic
    with zipfile.ZipFile(ISIC_DIR / "ISIC_2019_Training_Input.zip") as zf:
        for i in range(0, len(ds), 17):
            ex = ds.source[i]
            assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
            assert ex["label"] == ds.labels[i]
            assert ex["image_id"].decode() == ds.metadata["image_id"][i]
            original = np.asarray(PIL.Image.open(io.BytesIO(zf.read(
                f"ISIC_2019_Training_Input/{ds.metadata['image_id'][i]}.jpg"))), np.float32)
            h, w, _ = original.shape
            m = min(h, w)
            centre = original[(h - m) // 2:(h + m) // 2, (w - m) // 2:(w + m) // 2]
            np.testing.assert_allclose(ex["image"].mean((0, 1)), centre.mean((0, 1)), atol=6)


def test_isic_class_is_visible_in_the_image(isic):
    """A nearest-centroid rule on the centre colour, fit on even rows, scores odd rows."""
    _, ds = isic
    centre = np.stack([ds.source[i]["image"][12:20, 12:20].mean((0, 1)) for i in range(len(ds))])
    train, test = np.arange(0, len(ds), 2), np.arange(1, len(ds), 2)
    centroids = np.stack([centre[train][ds.labels[train] == c].mean(0) for c in range(8)])
    pred = np.argmin(((centre[test, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.labels[test]).mean() > 0.9


def test_isic_reads_back_by_name_without_tensorflow(isic):
    tmp, ds = isic
    source = tfds.data_source("isic2019/32", data_dir=tmp, split="train", download=False)
    assert len(source) == len(ds)
    again = data.prepare("isic2019", data_dir=tmp, image_size=32, prepare_if_missing=False)
    np.testing.assert_array_equal(again.labels, ds.labels)
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("layout", ["flat", "nested", "double_nested", "zip"])
def test_isic_manual_dir_layouts(tmp_path, layout):
    images = isic_subset(tmp_path / "manual", layout)
    ds = prepare_tmp(tmp_path, tmp_path / "manual")
    ref = isic_reference(tmp_path / "manual")
    assert sorted(ds.metadata["image_id"]) == sorted(images)
    np.testing.assert_array_equal(ds.labels, [ref[i][0] for i in ds.metadata["image_id"]])


def test_isic_downloads_from_the_second_host_when_the_first_fails(tmp_path):
    isic_subset(tmp_path / "files", "zip")
    requested = []

    def fake_download(self, url):
        requested.append(url)
        if "isic-challenge-data" not in url:
            raise ConnectionError("host down")
        return tmp_path / "files" / url.rsplit("/", 1)[-1]

    with mock.patch.object(tfds.download.DownloadManager, "download", fake_download), \
            mock.patch.object(downloads, "unreachable", lambda url: None):
        ds = prepare_tmp(tmp_path, tmp_path / "empty_manual")
    assert len(ds) == 16
    for name in (GT, META, "ISIC_2019_Training_Input.zip"):
        assert f"https://isic-archive.s3.amazonaws.com/challenges/2019/{name}" in requested
        assert f"https://isic-challenge-data.s3.amazonaws.com/2019/{name}" in requested


def test_isic_missing_file_offline_names_file_urls_and_manual_dir(tmp_path):
    def offline(self, url):
        raise ConnectionError("no network")

    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(ISIC_DIR / META, manual)
    with mock.patch.object(tfds.download.DownloadManager, "download", offline), \
            mock.patch.object(downloads, "unreachable", lambda url: None):
        with pytest.raises(DataError) as e:
            prepare_tmp(tmp_path, manual)
    msg = str(e.value)
    assert GT in msg and str(manual) in msg and "isic-challenge-data.s3.amazonaws.com" in msg


def test_isic_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    images = isic_subset(tmp_path / "manual", "flat")
    (tmp_path / "manual" / f"{images[3]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match=f"{images[3]}.jpg") as e:
        prepare_tmp(tmp_path, tmp_path / "manual")
    assert "--data.skip_corrupt_images=true" in str(e.value)
    ds = prepare_tmp(tmp_path, tmp_path / "manual", skip_corrupt_images=True)
    assert len(ds) == 15 and images[3] not in ds.metadata["image_id"]
    info = isic2019.Builder(config="32", data_dir=tmp_path / "tfds").info
    assert info.metadata["num_skipped_corrupt_images"] == 1
    assert info.metadata["skipped_corrupt_images"][0].endswith(f"{images[3]}.jpg")


def write_csv_rows(path, rows, eol="\r\n"):
    path.write_text(eol.join(",".join(r) for r in rows) + eol)


def test_isic_ground_truth_errors_name_row_and_image(tmp_path):
    header = ["image"] + ISIC_CLASSES + ["UNK"]
    one_hot = ["0.0", "1.0"] + ["0.0"] * 7
    cases = {
        "line 1": [header + ["FOO"], ["ISIC_0000001"] + one_hot + ["0.0"]],
        "no label": [header, ["ISIC_0000001"] + ["0.0"] * 9],
        "2 labels": [header, ["ISIC_0000001", "1.0", "1.0"] + ["0.0"] * 7],
        "UNK": [header, ["ISIC_0000001"] + ["0.0"] * 8 + ["1.0"]],
    }
    for expected, rows in cases.items():
        write_csv_rows(tmp_path / GT, rows)
        with pytest.raises(DataError, match=expected) as e:
            isic2019.csv_files.read_ground_truth(tmp_path / GT)
        assert GT in str(e.value) and (expected == "line 1" or "ISIC_0000001" in str(e.value))
    # A re-saved copy with integers 0/1 and LF parses like the original.
    write_csv_rows(tmp_path / GT, [header, ["ISIC_0000001", "0", "1"] + ["0"] * 7], eol="\n")
    assert isic2019.csv_files.read_ground_truth(tmp_path / GT) == {"ISIC_0000001": 1}


def test_isic_unknown_column_stops_prepare_with_a_named_error(tmp_path):
    isic_subset(tmp_path / "manual", "zip", k=4)
    meta = tmp_path / "manual" / META
    meta.write_bytes(meta.read_bytes().replace(b"lesion_id", b"lesion", 1))
    with pytest.raises(DataError, match=f"{META} line 1: unknown column layout"):
        prepare_tmp(tmp_path, tmp_path / "manual")


def test_tfds_shuffle_spill_is_never_used(tmp_path, monkeypatch):
    """Above TFDS's in-memory limit TFDS would spill through tf.io.gfile (TensorFlow)."""
    isic_subset(tmp_path / "manual", "zip", k=8)
    monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    assert len(prepare_tmp(tmp_path, tmp_path / "manual")) == 8
    assert tfds_shuffle.MAX_MEM_BUFFER_SIZE == 1000


# ------------------------------------------------------------------------------------- NIH

@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nih")
    return tmp, data.prepare("nih_chestxray14", data_dir=tmp, manual_dir=NIH_DIR, image_size=32)


def test_nih_labels_groups_metadata_equal_csv(nih):
    tmp, ds = nih
    ref = nih_reference(NIH_DIR / NIH_CSV)
    ids = ds.metadata["image_id"]
    assert len(ds) == len(ref) == 120 and sorted(ids) == sorted(ref)
    expected = np.stack([ref[i]["labels"] for i in ids])  # [N, 14]
    assert ds.multilabel and ds.class_names == tuple(NIH_FINDINGS[:8])
    assert ds.labels.dtype == np.float32
    np.testing.assert_array_equal(ds.labels, expected[:, :8])
    np.testing.assert_array_equal(ds.metadata["all_labels"], expected)
    np.testing.assert_array_equal(ds.groups, [ref[i]["patient"] for i in ids])
    for key, col in (("follow_up", "follow_up"), ("age", "age"), ("sex", "sex"),
                     ("view_position", "view")):
        np.testing.assert_array_equal(ds.metadata[key], [ref[i][col] for i in ids])
    test_list = read_list(NIH_DIR / "test_list.txt")
    np.testing.assert_array_equal(ds.official_test, [i in test_list for i in ids])
    assert 0 < ds.official_test.sum() < len(ds)
    assert (ds.num_channels, ds.image_size) == (1, 32)
    chosen = data.prepare("nih_chestxray14", data_dir=tmp, image_size=32,
                          prepare_if_missing=False, labels=["Hernia", "Mass"])
    np.testing.assert_array_equal(chosen.labels, expected[:, [13, 4]])
    every = data.prepare("nih_chestxray14", data_dir=tmp, image_size=32, labels="all")
    assert every.class_names == tuple(NIH_FINDINGS)


def test_nih_samples_have_the_documented_structure():
    ref = nih_reference(NIH_DIR / NIH_CSV)
    patients = [v["patient"] for v in ref.values()]
    assert len(set(patients)) == 40 and len(patients) > len(set(patients))
    labels = np.stack([v["labels"] for v in ref.values()])
    assert labels[:, :8].sum(0).min() >= 10 and labels.sum(0).min() >= 2
    assert (labels.sum(1) == 0).sum() >= 5 and (labels.sum(1) >= 2).sum() >= 5
    train_val = read_list(NIH_DIR / "train_val_list.txt")
    test = read_list(NIH_DIR / "test_list.txt")
    assert train_val | test == set(ref) and not train_val & test
    assert not {n[:8] for n in train_val} & {n[:8] for n in test}  # patient-disjoint
    modes = [PIL.Image.open(io.BytesIO(b)).mode for b in nih_pngs().values()]
    assert modes.count("RGBA") >= 2 and modes.count("L") >= 100


def test_nih_images_are_grayscale_and_show_their_findings(nih):
    _, ds = nih
    pngs = nih_pngs()
    images = np.stack([ds.source[i]["image"] for i in range(len(ds))])  # [N, 32, 32, 1]
    assert images.shape == (120, 32, 32, 1) and images.dtype == np.uint8
    for i in range(0, len(ds), 13):
        original = np.asarray(PIL.Image.open(io.BytesIO(pngs[ds.metadata["image_id"][i]]))
                              .convert("L"), np.float32)
        assert abs(images[i].mean() - original.mean()) < 4
    # Finding k is drawn in cell (k // 4, k % 4) of a 4x4 grid: brighter there when present.
    for k in range(14):
        cell = images[:, 8 * (k // 4):8 * (k // 4) + 8, 8 * (k % 4):8 * (k % 4) + 8].mean((1, 2, 3))
        has = ds.metadata["all_labels"][:, k] == 1
        assert cell[has].mean() - cell[~has].mean() > 30


@pytest.mark.parametrize("variant", ["2017/Data_Entry_2017.csv",
                                     "v2020_patient_sex/Data_Entry_2017_v2020.csv",
                                     "kaggle/Data_Entry_2017.csv"])
def test_nih_every_csv_variant_parses_to_the_same_table(variant):
    ref = nih_reference(NIH_DIR / NIH_CSV)
    records = nih_chestxray14.read_label_csv(NIH_VARIANTS / variant)
    assert len(records) == len(ref)
    for r in records:
        expected = ref[r.image_id]
        np.testing.assert_array_equal(nih_chestxray14.multi_hot(r.labels), expected["labels"])
        assert (r.follow_up, r.patient_id, r.age, r.sex, r.view_position) == (
            expected["follow_up"], expected["patient"], expected["age"], expected["sex"],
            expected["view"])


def test_nih_csv_variant_bytes_are_the_real_formats():
    v2017 = (NIH_VARIANTS / "2017/Data_Entry_2017.csv").read_bytes()
    assert v2017.count(b"\r\n") == 121 and b"OriginalImagePixelSpacing[x,y],\r\n" in v2017
    row = v2017.split(b"\r\n")[1]
    assert re.fullmatch(rb"\d{8}_\d{3}\.png,[^,]+,\d{3},\d{8},\d{3}[YMD],[MF],(PA|AP),.*", row)
    assert b",011M," in v2017 and b",004D," in v2017
    sex = (NIH_VARIANTS / "v2020_patient_sex/Data_Entry_2017_v2020.csv").read_text()
    assert "Patient Sex" in sex and all(line.endswith(",") for line in sex.splitlines())
    v2020 = (NIH_DIR / NIH_CSV).read_text()
    assert "Patient Gender" in v2020 and "\r" not in v2020
    assert not v2020.splitlines()[0].endswith(",")


def test_nih_2017_csv_extracted_images_batch_script_names_and_no_lists(tmp_path, nih):
    """Box layout after extraction (images/), an `images_02.tar.gz` in a sub-folder, 2017 CSV."""
    manual = tmp_path / "manual"
    (manual / "images").mkdir(parents=True)
    with tarfile.open(NIH_DIR / "images_001.tar.gz") as tar:
        tar.extractall(manual, filter="data")
    (manual / "CXR8" / "images").mkdir(parents=True)
    shutil.copy(NIH_DIR / "images_002.tar.gz", manual / "CXR8" / "images" / "images_02.tar.gz")
    shutil.copy(NIH_VARIANTS / "2017" / "Data_Entry_2017.csv", manual)
    ds = prepare_tmp(tmp_path, manual, name="nih_chestxray14")
    _, full = nih
    assert ds.official_test is None
    order = np.argsort(ds.metadata["image_id"])
    full_order = np.argsort(full.metadata["image_id"])
    np.testing.assert_array_equal(ds.labels[order], full.labels[full_order])
    np.testing.assert_array_equal(ds.groups[order], full.groups[full_order])


def test_nih_missing_csv_lists_exactly_which_files_go_where(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(NIH_DIR / "images_001.tar.gz", manual)
    with pytest.raises(DataError) as e:
        prepare_tmp(tmp_path, manual, name="nih_chestxray14")
    msg = str(e.value)
    for expected in (str(manual / NIH_CSV), str(manual / "train_val_list.txt"),
                     str(manual / "test_list.txt"), "images_001.tar.gz", "images_012.tar.gz",
                     "https://nihcc.app.box.com/v/ChestXray-NIHCC"):
        assert expected in msg
    assert "Traceback" not in msg
    # Without manual_dir the message names TFDS's default manual folder.
    with pytest.raises(DataError, match=str(tmp_path / "tfds" / "downloads" / "manual")):
        prepare_tmp(tmp_path, None, name="nih_chestxray14")


def test_nih_missing_images_name_them_and_their_archive(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(NIH_DIR / "images_001.tar.gz", manual)
    shutil.copy(NIH_DIR / NIH_CSV, manual)
    with tarfile.open(NIH_DIR / "images_002.tar.gz") as tar:
        missing = sorted(m.name.split("/")[-1] for m in tar if m.isfile())
    with pytest.raises(DataError, match=f"{len(missing)} images listed") as e:
        prepare_tmp(tmp_path, manual, name="nih_chestxray14")
    assert "images_002.tar.gz" in str(e.value) and any(m in str(e.value) for m in missing)


def test_nih_table_errors_name_file_line_and_image(tmp_path):
    rows = (NIH_DIR / NIH_CSV).read_text().splitlines()
    bad_label = rows[:3] + [rows[3].replace(",", ",Pneumonitis|", 1)]
    (tmp_path / NIH_CSV).write_text("\n".join(bad_label) + "\n")
    image = rows[3].split(",")[0]
    with pytest.raises(DataError, match=f"line 4 \\(image {image}\\).*Pneumonitis"):
        nih_chestxray14.read_label_csv(tmp_path / NIH_CSV)
    (tmp_path / NIH_CSV).write_text(rows[0].replace("View Position", "View") + "\n" + rows[1])
    with pytest.raises(DataError, match="line 1: unknown column layout"):
        nih_chestxray14.read_label_csv(tmp_path / NIH_CSV)
    bad_age = rows[:2] + [",".join(f if i != 4 else "5x" for i, f in enumerate(rows[2].split(",")))]
    (tmp_path / NIH_CSV).write_text("\n".join(bad_age))
    with pytest.raises(DataError, match="line 3 .*Patient Age '5x'"):
        nih_chestxray14.read_label_csv(tmp_path / NIH_CSV)


def test_nih_unknown_label_stops_prepare_with_a_named_error(tmp_path):
    nih_subset(tmp_path / "manual", k=3)
    table = tmp_path / "manual" / NIH_CSV
    lines = table.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[1], "Covid", 1)
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{NIH_CSV} line 3 .*Covid"):
        prepare_tmp(tmp_path, tmp_path / "manual", name="nih_chestxray14")


def test_nih_corrupt_png_is_named_or_skipped_and_counted(tmp_path):
    names = nih_subset(tmp_path / "manual", k=10)
    (tmp_path / "manual" / "images" / names[5]).write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptImageError, match=names[5]):
        prepare_tmp(tmp_path, tmp_path / "manual", name="nih_chestxray14")
    ds = prepare_tmp(tmp_path, tmp_path / "manual", name="nih_chestxray14",
                     skip_corrupt_images=True)
    assert len(ds) == 9 and names[5] not in ds.metadata["image_id"]
    info = nih_chestxray14.Builder(config="32", data_dir=tmp_path / "tfds").info
    assert info.metadata["num_skipped_corrupt_images"] == 1


def test_nih_downloads_and_checks_archives_when_there_are_no_images(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(NIH_DIR / NIH_CSV, manual)
    fake = tuple(nih_chestxray14.Archive(name, f"https://example.invalid/{name}",
                                         hashlib.md5((NIH_DIR / name).read_bytes()).hexdigest(),
                                         first)
                 for name, first in (("images_001.tar.gz", "00000001_000.png"),
                                     ("images_002.tar.gz", "00001336_000.png")))

    def fake_download(self, urls):
        return {k: NIH_DIR / url.rsplit("/", 1)[-1] for k, url in urls.items()}

    with mock.patch.object(tfds.download.DownloadManager, "download", fake_download), \
            mock.patch.object(downloads, "unreachable", lambda url: None), \
            mock.patch.object(nih_builder_module, "ARCHIVES", fake):
        assert len(prepare_tmp(tmp_path, manual, name="nih_chestxray14")) == 120
        broken = (fake[0], dataclasses.replace(fake[1], md5="0" * 32))
        with mock.patch.object(nih_builder_module, "ARCHIVES", broken):
            with pytest.raises(DataError, match="images_002.tar.gz.*has MD5"):
                data.prepare("nih_chestxray14", data_dir=tmp_path / "tfds2", manual_dir=manual,
                             image_size=32)


def test_nih_archive_table_matches_the_sample_archives():
    assert len(nih_chestxray14.ARCHIVES) == 12
    for archive in ("images_001.tar.gz", "images_002.tar.gz"):
        with tarfile.open(NIH_DIR / archive) as tar:
            assert {nih_chestxray14.archive_of(m.name.split("/")[-1])
                    for m in tar if m.isfile()} == {archive}


# -------------------------------------------------------------------------- prepare() API

def test_prepare_rejects_bad_arguments_by_name(tmp_path):
    with pytest.raises(ValueError, match="image_size=48"):
        data.prepare("isic2019", data_dir=tmp_path, image_size=48)
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        data.prepare("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="Pneumonitis"):
        data.prepare("nih_chestxray14", data_dir=tmp_path, labels=["Mass", "Pneumonitis"])
    with pytest.raises(ValueError, match="labels must be None"):
        data.prepare("isic2019", data_dir=tmp_path, labels=["MEL"])
    with pytest.raises(DataError, match="not prepared"):
        data.prepare("isic2019", data_dir=tmp_path, image_size=32, prepare_if_missing=False)


def test_sample_files_are_small_and_regenerate_identically(tmp_path):
    root = NIH_DIR.parent
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    make_samples.main(["--out", str(tmp_path)])
    regenerated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert regenerated == sorted(p.relative_to(root) for p in files)
    for rel in regenerated:
        a, b = root / rel, tmp_path / rel
        if rel.suffix in (".csv", ".txt"):
            assert a.read_bytes() == b.read_bytes(), rel
        else:
            shipped, again = archive_pixels(a), archive_pixels(b)
            assert shipped.keys() == again.keys()
            for name, pixels in shipped.items():
                np.testing.assert_allclose(pixels, again[name], atol=2)


def archive_pixels(path):
    """member name -> decoded pixels (float32) of every image in a zip or tar.gz."""
    members = {}
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            members = {n: zf.read(n) for n in zf.namelist() if n.endswith(".jpg")}
    else:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return {n: np.asarray(PIL.Image.open(io.BytesIO(b)), np.float32) for n, b in members.items()}
