"""The `csv_images` builder: a user's own images + CSV, through `prepare` and a whole tiny run.

Every input is generated here: small PNG/JPEG images written with PIL and a CSV written with
the csv module. Expected labels and groups are the values written into that CSV.
"""
from __future__ import annotations

import csv
import json
import logging
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest

from experiments import lesion
from rosjax import config as C
from rosjax.data import DataError, datasets, splits
from rosjax.experiment import runner, validate
from rosjax.experiment import settings as settings_lib

CLASSES = ["nevus", "melanoma", "keratosis"]  # deliberately unsorted: names are sorted when read
FINDINGS = ["Effusion", "Mass", "Atelectasis"]


def write_images(folder, names, *, size=(24, 20), grey=False, seed=0):
    """Random images; every 3rd in a sub-folder, PNG and JPEG alternately."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    files = {}
    for i, name in enumerate(names):
        shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
        img = PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        ext = ".png" if i % 2 else ".jpg"
        path = (folder / "nested" / "deeper" if i % 3 == 0 else folder) / f"{name}{ext}"
        img.save(path)
        files[name] = path
    return files


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def one_label_rows(n, seed=1):
    """(image, class, patient) rows; patients hold 1-3 images each."""
    rng = np.random.default_rng(seed)
    rows, patient = [], 0
    while len(rows) < n:
        for _ in range(int(rng.integers(1, 4))):
            if len(rows) < n:
                rows.append([f"img_{len(rows):03d}", CLASSES[int(rng.integers(0, 3))], f"P{patient}"])
        patient += 1
    return rows


@pytest.fixture
def one_label(tmp_path):
    rows = one_label_rows(30)
    files = write_images(tmp_path / "manual", [r[0] for r in rows])
    # Half the CSV names carry the extension, half do not; 2 images are not in the CSV at all.
    csv_rows = [[r[0] + files[r[0]].suffix if i % 2 else r[0], r[1], r[2]] for i, r in enumerate(rows)]
    write_images(tmp_path / "manual" / "unlisted", ["stray_a", "stray_b"], seed=9)
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "diagnosis", "patient"], csv_rows)
    return tmp_path, rows, csv_rows


def prepare(tmp_path, **kw):
    kw.setdefault("manual_dir", tmp_path / "manual")
    kw.setdefault("csv", "labels.csv")
    return datasets.prepare("csv_images", data_dir=tmp_path / "tfds", image_size=32, **kw)


def test_one_label_labels_groups_and_unlisted_images(one_label, caplog):
    tmp_path, rows, csv_rows = one_label
    with caplog.at_level(logging.WARNING):
        ds = prepare(tmp_path, image_column="file", label_columns=("diagnosis",), group_column="patient")
    assert ds.class_names == ("keratosis", "melanoma", "nevus") and not ds.multilabel
    assert len(ds) == 30 and ds.num_channels == 3 and ds.image_size == 32
    expected = {name: (cls, patient) for name, cls, patient in csv_rows}
    got = {str(i): (ds.class_names[label], str(g))
           for i, label, g in zip(ds.metadata["image_id"], ds.labels, ds.groups)}
    assert got == expected
    assert ds.labels.dtype == np.int32
    assert ds.source[0]["image"].shape == (32, 32, 3)
    assert "2 image files" in caplog.text and "not listed" in caplog.text


def test_group_column_is_respected_by_the_grouped_split(one_label):
    tmp_path, rows, _ = one_label
    ds = prepare(tmp_path, image_column="file", label_columns=("diagnosis",), group_column="patient")
    split = splits.grouped_split(ds.groups, ds.labels, fractions=(0.6, 0.2, 0.2), seed=0)
    patient_of = {r[2] for r in rows}
    members = {n: {str(g) for g in ds.groups[idx]} for n, idx in split.items()}
    assert set().union(*members.values()) == patient_of
    assert not (members["train"] & members["test"]) and not (members["train"] & members["validation"])
    assert not (members["validation"] & members["test"])
    # Without a group column every image is its own group.
    ds = prepare(tmp_path, image_column="file", label_columns=("diagnosis",))
    assert list(ds.groups) == list(ds.metadata["image_id"])


def test_multilabel_zero_one_columns_and_greyscale(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"cxr{i}" for i in range(12)]
    write_images(tmp_path / "manual", names, grey=True)
    hot = rng.integers(0, 2, (12, 3))
    write_csv(tmp_path / "manual" / "labels.csv", ["Image", *FINDINGS, "Patient"],
              [[n, *map(str, h), f"p{i // 2}"] for i, (n, h) in enumerate(zip(names, hot))])
    ds = prepare(tmp_path, image_column="Image", label_columns=tuple(FINDINGS), group_column="Patient",
                 channels=1)
    assert ds.multilabel and ds.class_names == tuple(FINDINGS)  # the column order, not sorted
    expected = {n: list(h) for n, h in zip(names, hot)}
    assert {str(i): list(map(int, v)) for i, v in zip(ds.metadata["image_id"], ds.labels)} == expected
    assert ds.labels.dtype == np.float32 and ds.source[0]["image"].shape == (32, 32, 1)
    # --data.labels picks classes of a multi-label table.
    ds = prepare(tmp_path, image_column="Image", label_columns=tuple(FINDINGS), channels=1,
                 labels=("Mass",))
    assert ds.class_names == ("Mass",)
    assert {str(i): int(v[0]) for i, v in zip(ds.metadata["image_id"], ds.labels)} == \
        {n: int(h[1]) for n, h in zip(names, hot)}


def test_multilabel_separated_findings_column(tmp_path):
    names = [f"x{i}" for i in range(8)]
    write_images(tmp_path / "manual", names)
    cells = ["Mass|Effusion", "", "Atelectasis", "Mass", "Effusion | Atelectasis | Mass", "", "Mass", "Effusion"]
    write_csv(tmp_path / "manual" / "labels.csv", ["name", "findings"], list(zip(names, cells)))
    ds = prepare(tmp_path, image_column="name", label_columns=("findings",), label_separator="|")
    assert ds.class_names == ("Atelectasis", "Effusion", "Mass")
    expected = {n: [int(c in {x.strip() for x in cell.split("|")}) for c in ("Atelectasis", "Effusion", "Mass")]
                for n, cell in zip(names, cells)}
    assert {str(i): list(map(int, v)) for i, v in zip(ds.metadata["image_id"], ds.labels)} == expected
    assert expected["x1"] == [0, 0, 0]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_images_inside_an_archive(tmp_path, kind):
    rows = one_label_rows(9)
    files = write_images(tmp_path / "loose", [r[0] for r in rows])
    (tmp_path / "manual").mkdir()
    archive = tmp_path / "manual" / f"images.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in files.values():
                zf.write(path, f"images/{path.name}")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for path in files.values():
                tar.add(path, f"images/{path.name}")
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "dx"], [r[:2] for r in rows])
    ds = prepare(tmp_path, image_column="file", label_columns=("dx",))
    assert {str(i): ds.class_names[v] for i, v in zip(ds.metadata["image_id"], ds.labels)} == \
        {r[0]: r[1] for r in rows}


def test_two_tables_in_one_data_dir_do_not_collide(one_label):
    tmp_path, _, csv_rows = one_label
    a = prepare(tmp_path, image_column="file", label_columns=("diagnosis",))
    flipped = [[r[0], "nevus" if r[1] != "nevus" else "melanoma", r[2]] for r in csv_rows]
    write_csv(tmp_path / "manual" / "other.csv", ["file", "diagnosis", "patient"], flipped)
    b = prepare(tmp_path, csv="other.csv", image_column="file", label_columns=("diagnosis",))
    assert {str(i): b.class_names[v] for i, v in zip(b.metadata["image_id"], b.labels)} == \
        {r[0]: r[1] for r in flipped}
    assert len(list((tmp_path / "tfds" / "csv_images").glob("32_*"))) == 2
    assert len(a) == len(b) == 30


# ----------------------------------------------------------------------------------- errors

def test_missing_columns_are_named(one_label):
    tmp_path, *_ = one_label
    with pytest.raises(DataError, match=r"labels.csv line 1: no column 'image' \(--data.image_column\)"):
        prepare(tmp_path, image_column="image", label_columns=("diagnosis",))
    with pytest.raises(DataError, match=r"no column 'dx' \(--data.label_columns\).*'diagnosis'"):
        prepare(tmp_path, image_column="file", label_columns=("dx",))
    with pytest.raises(DataError, match=r"no column 'lesion' \(--data.group_column\)"):
        prepare(tmp_path, image_column="file", label_columns=("diagnosis",), group_column="lesion")
    with pytest.raises(DataError, match="--data.csv=nope.csv: no such file"):
        prepare(tmp_path, csv="nope.csv", image_column="file", label_columns=("diagnosis",))


def test_a_non_binary_value_in_a_zero_one_column_is_named(tmp_path):
    names = [f"a{i}" for i in range(4)]
    write_images(tmp_path / "manual", names)
    write_csv(tmp_path / "manual" / "labels.csv", ["f", "Mass", "Edema"],
              [[names[0], "1", "0"], [names[1], "0", "1"], [names[2], "1", "maybe"], [names[3], "0", "0"]])
    with pytest.raises(DataError, match=r"labels.csv line 4 \(image a2\), column 'Edema': 'maybe' is not 0 or 1"):
        prepare(tmp_path, image_column="f", label_columns=("Mass", "Edema"))


def test_a_listed_image_that_is_absent_is_named(one_label):
    tmp_path, rows, csv_rows = one_label
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "diagnosis", "patient"],
              [*csv_rows, ["ghost.png", "nevus", "P99"]])
    with pytest.raises(DataError, match=r"1 of the 31 images listed in .*labels.csv .* e.g. ghost.png \(line 32\)"):
        prepare(tmp_path, image_column="file", label_columns=("diagnosis",))
    assert not list((tmp_path / "tfds" / "csv_images").glob("32_*/1.0.0/*.json"))


def test_empty_class_and_repeated_image_are_named(one_label):
    tmp_path, rows, csv_rows = one_label
    bad = [list(r) for r in csv_rows]
    bad[4][1] = ""
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "diagnosis", "patient"], bad)
    with pytest.raises(DataError, match=r"line 6 \(image img_004\): column 'diagnosis' is empty"):
        prepare(tmp_path, image_column="file", label_columns=("diagnosis",))
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "diagnosis", "patient"], [*csv_rows, csv_rows[2]])
    with pytest.raises(DataError, match=r"line 32: image img_002 is listed twice \(first on line 4\)"):
        prepare(tmp_path, image_column="file", label_columns=("diagnosis",))


def test_start_up_checks_of_the_csv_options():
    base = lesion.get_config(smoke=True)

    def problems(**overrides):
        cfg = C.apply_overrides(base, {k.replace("__", "."): v for k, v in overrides.items()})
        p = validate._Problems()
        validate._check_data(p, cfg, devices=1)
        return p.lines

    bad = problems(data__dataset="csv_images")
    assert any(x.startswith("--data.csv=None: csv_images needs") for x in bad)
    assert any(x.startswith("--data.image_column=: csv_images needs") for x in bad)
    assert any(x.startswith("--data.label_columns=: csv_images needs") for x in bad)
    ok = dict(data__dataset="csv_images", data__csv="l.csv", data__image_column="f", data__label_columns="dx")
    assert problems(**ok) == []
    assert problems(**ok, data__channels="2") == ["--data.channels=2: expected 1 (greyscale) or 3 (RGB)"]
    assert problems(**{**ok, "data__label_columns": "a,b"}, data__label_separator="|") == [
        "--data.label_separator=|: splits one column of findings; give exactly one --data.label_columns"]
    # Multi-label tables take flip noise, one-label ones symmetric/pair.
    assert problems(**{**ok, "data__label_columns": "a,b"}, data__noise="symmetric", data__noise_rate="0.1")[0] \
        .startswith("--data.noise=symmetric: csv_images takes flip noise")
    assert problems(data__csv="l.csv") == ["--data.csv=l.csv: only for --data.dataset=csv_images (your own CSV)"]


# ----------------------------------------------------------------------------- a whole run

def test_tiny_one_label_run_end_to_end(tmp_path):
    from tests.test_experiment import TINY  # noqa: PLC0415

    rows = one_label_rows(64, seed=5)
    write_images(tmp_path / "manual", [r[0] for r in rows], size=(40, 40))
    write_csv(tmp_path / "manual" / "labels.csv", ["file", "diagnosis", "patient"], rows)
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {
        **TINY, "data.dataset": "csv_images", "data.manual_dir": str(tmp_path / "manual"),
        "data.csv": "labels.csv", "data.image_column": "file", "data.label_columns": "diagnosis",
        "data.group_column": "patient", "data.data_dir": str(tmp_path / "tfds")})
    assert cfg.data.manual_dir == str(tmp_path / "manual")
    stages = ["data", "teachers", "settings", "evaluate", "report"]
    report = runner.run(cfg, tmp_path / "work", stages=stages, settings=settings_lib.requested(cfg))
    assert report["data"]["class_names"] == ["keratosis", "melanoma", "nevus"]
    assert report["data"]["examples"] == 64
    assert sum(report["data"]["split_sizes"].values()) == 64
    assert all(v == 0 for v in report["data"]["group_overlap"].values())
    counts = {c: sum(r[1] == c for r in rows) for c in ("keratosis", "melanoma", "nevus")}
    per_class = np.sum([report["data"]["splits"][s]["per_class"] for s in ("train", "validation", "test")], axis=0)
    assert list(per_class) == [counts["keratosis"], counts["melanoma"], counts["nevus"]]
    for name in ("baseline_iii", "ros_kd"):
        test = report["settings"][name]["test"]
        assert 0.0 <= test["f1_macro"] <= 1.0 and test["num_examples"] == report["data"]["split_sizes"]["test"]
    assert (tmp_path / "work" / "report.md").exists()


def test_the_smoke_command_runs_every_stage_on_a_generated_csv_dataset(tmp_path):
    """`python -m experiments.lesion --smoke` on the user's own files: every stage, sweeps included
    (tiny_cnn models, so it takes a minute), then the report."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from tests.test_experiment import REPO, tiny_argv  # noqa: PLC0415

    rows = one_label_rows(150, seed=5)
    write_images(tmp_path / "own", [r[0] for r in rows])
    write_csv(tmp_path / "own" / "labels.csv", ["file", "diagnosis", "patient"], rows)
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "experiments.lesion", "--smoke", "--workdir", str(workdir),
               "--data.dataset=csv_images", f"--data.manual_dir={tmp_path / 'own'}", "--data.csv=labels.csv",
               "--data.image_column=file", "--data.label_columns=diagnosis", "--data.group_column=patient",
               f"--data.data_dir={tmp_path / 'tfds'}", *tiny_argv()]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["data"]["dataset"] == "csv_images" and report["data"]["examples"] == 150
    assert report["data"]["class_names"] == sorted({r[1] for r in rows})
    assert set(report["sweeps"]) == {"overlap", "student", "weights"}
    assert report["settings"]["ros_kd"]["test"]["num_examples"] == report["data"]["split_sizes"]["test"]
