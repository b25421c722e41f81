"""Splits as data: WORKDIR/data/split.json written by `write_split`, read back by --data.split_file.

The dataset is a generated csv_images table (tests/test_csv_images.py's helpers), so the
groups and classes every check compares against are the values written into its CSV.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import lesion
from rosjax import config as C
from rosjax.data import DataError
from rosjax.experiment import data as data_lib
from rosjax.experiment import validate
from tests.test_csv_images import one_label_rows, write_csv, write_images


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    rows = one_label_rows(60, seed=11)
    write_images(root / "manual", [r[0] for r in rows])
    write_csv(root / "manual" / "labels.csv", ["file", "diagnosis", "patient"], rows)
    return root, rows


def config(root, **extra):
    return C.apply_overrides(lesion.get_config(smoke=True), {
        "data.dataset": "csv_images", "data.manual_dir": str(root / "manual"), "data.csv": "labels.csv",
        "data.image_column": "file", "data.label_columns": "diagnosis", "data.group_column": "patient",
        "data.data_dir": str(root / "tfds"), "data.noise": "symmetric", "data.noise_rate": "0.3",
        "teachers.architectures": "tiny_cnn,tiny_cnn,tiny_cnn", **extra})


@pytest.fixture(scope="module")
def written(table):
    root, rows = table
    cfg = config(root)
    data = data_lib.load(cfg)
    path = root / "work" / "data" / "split.json"
    data_lib.write_split(data, cfg, path)
    return root, rows, data, json.loads(path.read_text()), path


def test_split_json_holds_ids_subsets_and_noise(written):
    root, rows, data, content, _ = written
    cls = {r[0]: r[1] for r in rows}
    patient = {r[0]: r[2] for r in rows}
    s = content["splits"]
    assert sorted(s["train"] + s["validation"] + s["test"]) == sorted(cls)  # every CSV image once
    assert {n: len(v) for n, v in s.items()} == {n: len(v) for n, v in data.splits.items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not {patient[x] for x in s[a]} & {patient[x] for x in s[b]}
    assert len(content["teacher_subsets"]) == 3
    train = set(s["train"])
    for subset in content["teacher_subsets"]:
        assert set(subset["image_ids"]) <= train
    assert set().union(*(set(t["image_ids"]) for t in content["teacher_subsets"])) == train
    noise = content["noise"]
    assert noise["mode"] == "symmetric" and noise["rate"] == 0.3
    assert 0 < len(noise["rows"]) < len(train)
    for row in noise["rows"]:
        assert row["image_id"] in train
        assert row["clean"] == cls[row["image_id"]] and row["noisy"] != row["clean"]
        assert row["noisy"] in ("keratosis", "melanoma", "nevus")
    ids = data.dataset.metadata["image_id"]
    changed = {str(ids[i]) for i in np.flatnonzero(data.train_labels != data.dataset.labels)}
    assert {r["image_id"] for r in noise["rows"]} == changed


def test_a_written_split_fed_back_reproduces_the_run(written):
    root, rows, data, content, path = written
    # Another split seed: the file, not the seed, decides the split.
    again = data_lib.load(config(root, **{"data.split_file": str(path), "data.split_seed": "7"}))
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(again.splits[name], data.splits[name])
    for a, b in zip(again.subsets, data.subsets):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.train_labels, data.train_labels)
    seeded = data_lib.load(config(root, **{"data.split_seed": "7"}))
    assert any(not np.array_equal(seeded.splits[n], data.splits[n]) for n in ("train", "test"))


def test_a_split_json_written_by_a_run_gives_the_same_report(table, tmp_path):
    """Run → WORKDIR/data/split.json → a run on another split seed with --data.split_file: same report."""
    from rosjax.experiment import runner  # noqa: PLC0415

    root, _ = table
    quick = {"distill.student": "tiny_cnn", "optim.epochs": "2", "optim.milestones": "1",
             "distill.warmup_epochs": "0", "distill.rl_equal_epochs": "0", "settings": "baseline_i"}
    stages = ["data", "settings", "evaluate", "report"]
    first = runner.run(config(root, **quick), tmp_path / "first", stages=stages, settings=["baseline_i"])
    split = tmp_path / "first" / "data" / "split.json"
    second = runner.run(config(root, **quick, **{"data.split_file": str(split), "data.split_seed": "7"}),
                        tmp_path / "second", stages=stages, settings=["baseline_i"])
    assert second["data"]["split_sizes"] == first["data"]["split_sizes"]
    assert second["settings"]["baseline_i"]["test"] == first["settings"]["baseline_i"]["test"]


def test_a_folder_of_id_lists_works_too(written, tmp_path):
    root, _, data, content, _ = written
    for name, ids in content["splits"].items():
        (tmp_path / f"{name}.txt").write_text("# my split\n" + "\n".join(ids) + "\n\n")
    again = data_lib.load(config(root, **{"data.split_file": str(tmp_path)}))
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(again.splits[name], data.splits[name])


def refused(root, tmp_path, lists, match):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"splits": lists}))
    with pytest.raises(DataError, match=match):
        data_lib.load(config(root, **{"data.split_file": str(path)}))


def test_unknown_ids_are_refused(written, tmp_path):
    root, _, _, content, _ = written
    s = {k: list(v) for k, v in content["splits"].items()}
    s["test"] += ["img_999", "nope"]
    refused(root, tmp_path, s, r"2 ids are not images of the prepared dataset \(60 images\), "
                               r"e.g. 'img_999' \(test\), 'nope' \(test\)")


def test_ids_in_two_splits_are_refused(written, tmp_path):
    root, _, _, content, _ = written
    s = {k: list(v) for k, v in content["splits"].items()}
    first = s["train"][0]
    s["validation"].append(first)
    refused(root, tmp_path, s, rf"1 ids are listed twice, e.g. '{first}' \(train and validation\)")


def test_groups_in_two_splits_are_refused(written, tmp_path):
    root, rows, _, content, _ = written
    patient = {r[0]: r[2] for r in rows}
    s = {k: list(v) for k, v in content["splits"].items()}
    # A patient with two training images: move the second one to test.
    by_patient = {}
    for x in s["train"]:
        by_patient.setdefault(patient[x], []).append(x)
    group, (kept, moved, *_) = next((g, xs) for g, xs in by_patient.items() if len(xs) >= 2)
    s["train"].remove(moved)
    s["test"].append(moved)
    refused(root, tmp_path, s, rf"1 groups \(patients/lesions\) are in two splits, e.g. group '{group}' "
                               rf"\(image '{kept}' in train, '{moved}' in test\)")


def test_malformed_split_files_are_named(written, tmp_path):
    root, *_ = written
    (tmp_path / "bad.json").write_text('{"splits": {"train": ["a"]}}')
    with pytest.raises(DataError, match="expected a JSON object with lists of image ids"):
        data_lib.load(config(root, **{"data.split_file": str(tmp_path / "bad.json")}))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a\n")
    with pytest.raises(DataError, match="the folder lacks validation.txt, test.txt"):
        data_lib.load(config(root, **{"data.split_file": str(tmp_path / "lists")}))


def test_start_up_check_of_the_split_file(tmp_path):
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"data.split_file": str(tmp_path / "missing.json")})
    p = validate._Problems()
    validate._check_data(p, cfg, devices=1)
    assert p.lines == [f"--data.split_file={tmp_path / 'missing.json'}: no such file or folder "
                       "(a split.json, or a folder of train.txt, validation.txt, test.txt)"]


# ------------------------------------------- chest X-ray protocol options (nih_chestxray14)

NIH_CSV = "Data_Entry_2017_v2020.csv"


@pytest.fixture(scope="module")
def nih_rows():
    """image -> (patient, follow-up, view) from the bundled sample CSV, read with the csv module."""
    import csv  # noqa: PLC0415

    from rosjax.data import sample_dir  # noqa: PLC0415
    with open(sample_dir("nih_chestxray14") / NIH_CSV, newline="") as f:
        return {r["Image Index"]: (r["Patient ID"], int(r["Follow-up #"]), r["View Position"])
                for r in csv.DictReader(f)}


def nih_load(tmp_path_factory, **extra):
    from experiments import nih_cxr  # noqa: PLC0415
    data_dir = tmp_path_factory.getbasetemp() / "nih_tfds"
    cfg = C.apply_overrides(nih_cxr.get_config(smoke=True), {"data.data_dir": str(data_dir), **extra})
    p = validate._Problems()
    validate._check_data(p, cfg, devices=1)
    assert p.lines == []
    return data_lib.load(cfg)


def used_ids(data):
    ids = data.dataset.metadata["image_id"]
    return sorted(str(ids[i]) for rows in data.splits.values() for i in rows)


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_views_keep_only_that_view_position(tmp_path_factory, nih_rows, view):
    data = nih_load(tmp_path_factory, **{"data.views": view})
    expected = sorted(x for x, (_, _, v) in nih_rows.items() if v == view)
    assert 0 < len(expected) < len(nih_rows)
    assert used_ids(data) == expected
    assert used_ids(nih_load(tmp_path_factory)) == sorted(nih_rows)  # "both", the paper's


def test_one_image_per_patient_keeps_the_first_follow_up(tmp_path_factory, nih_rows):
    data = nih_load(tmp_path_factory, **{"data.one_image_per_patient": "true"})
    first = {}
    for image, (patient, follow_up, _) in sorted(nih_rows.items()):
        if patient not in first or follow_up < nih_rows[first[patient]][1]:
            first[patient] = image
    assert len(first) < len(nih_rows)
    assert used_ids(data) == sorted(first.values())


def test_labels_all_means_the_14_findings(tmp_path_factory):
    from rosjax.data.nih_chestxray14 import LABEL_NAMES  # noqa: PLC0415
    cfg = C.apply_overrides(lesion.get_config(), {"data.dataset": "nih_chestxray14", "data.labels": "all"})
    assert cfg.data.labels == ("all",)
    data = nih_load(tmp_path_factory, **{"data.labels": "all"})
    assert data.dataset.class_names == LABEL_NAMES and len(LABEL_NAMES) == 14
    assert data.train_labels.shape[1] == 14


def test_protocol_options_are_checked_at_start_up():
    def problems(**overrides):
        cfg = C.apply_overrides(lesion.get_config(smoke=True), overrides)
        p = validate._Problems()
        validate._check_data(p, cfg, devices=1)
        return p.lines

    assert problems(**{"data.views": "LAT"})[0] == "--data.views=LAT: expected one of both, PA, AP"
    assert problems(**{"data.views": "PA"}) == [
        "--data.views=PA: a chest X-ray protocol option: only nih_chestxray14 has view positions and follow-ups"]
    assert problems(**{"data.stored_size": "512"}) == [
        "--data.stored_size=512: expected one of 32, 64, 96, 128, 224, 256"]  # isic2019: no 512
    assert problems(**{"data.dataset": "nih_chestxray14", "data.stored_size": "512", "data.pixel_mean": "0.5",
                       "data.pixel_std": "0.25", "data.augment": "chest_xray"}) == []
    assert problems(**{"data.dataset": "nih_chestxray14", "data.labels": "all,Mass", "data.pixel_mean": "0.5",
                       "data.pixel_std": "0.25"})[0].startswith("--data.labels=all: unknown finding")


def test_nih_has_a_512_px_config():
    from rosjax.data import nih_chestxray14  # noqa: PLC0415
    assert 512 in nih_chestxray14.IMAGE_SIZES
    assert nih_chestxray14.Builder.builder_configs["512"].image_size == 512
