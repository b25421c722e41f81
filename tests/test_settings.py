"""The registry's protocol rows: Baseline II from a full-split teacher (the paper's) or a subset one,
the traditional Baseline III, the fixed-normalisation RoS-KD variants, and which settings run by default."""
import json

import pytest

from experiments import lesion
from rosjax import config as C
from rosjax.experiment import runner
from rosjax.experiment import settings as settings_lib

PAPER = lesion.get_config()  # teachers resnet18, mobilenet_v2, ..., densenet121; normalize sum1


def test_teacher_keys_name_subset_and_full_split_teachers():
    archs = PAPER.teachers.architectures
    assert settings_lib.get("baseline_ii").teacher_keys(PAPER) == ["densenet121"]  # the paper: full split
    assert settings_lib.get("baseline_ii_subset").teacher_keys(PAPER) == [archs.index("densenet121")]
    assert settings_lib.get("baseline_iii").teacher_keys(PAPER) == list(range(len(archs)))
    assert settings_lib.get("baseline_iii_full").teacher_keys(PAPER) == list(archs)
    assert settings_lib.get("baseline_i").teacher_keys(PAPER) == []
    # The teachers stage trains the full-split teachers the requested settings name, once each.
    assert settings_lib.full_teachers(PAPER, ["baseline_i", "baseline_iii", "ros_kd"]) == []
    assert settings_lib.full_teachers(PAPER, ["baseline_ii", "baseline_iii_full"]) == [
        "densenet121", *[a for a in archs if a != "densenet121"]]
    repeated = C.apply_overrides(PAPER, {"teachers.architectures": "tiny_cnn,tiny_cnn"})
    assert settings_lib.get("baseline_iii_full").teacher_keys(repeated) == ["tiny_cnn"]  # one per architecture


@pytest.mark.parametrize("option", ["none", "sum1", "sumk"])
def test_variants_fix_their_normalisation_and_skip_a_repeat_of_ros_kd(option):
    cfg = C.apply_overrides(PAPER, {"distill.normalize": option})
    assert settings_lib.get("ros_kd").kd_weights(cfg) == (option, False)
    for variant in ("none", "sum1", "sumk"):
        entry = settings_lib.get(f"ros_kd_{variant}")
        assert entry.kd_weights(cfg) == (variant, False)
        assert entry.same_run_as(cfg) == ("ros_kd" if variant == option else None)
    assert settings_lib.get("baseline_iii").kd_weights(cfg) == ("sum1", False)
    default = settings_lib.requested(cfg)
    assert [v for v in ("none", "sum1", "sumk") if f"ros_kd_{v}" in default] == [
        v for v in ("none", "sum1", "sumk") if v != option]
    # Per-example draws make RoS-KD another run: every variant trains then.
    per_example = C.apply_overrides(cfg, {"distill.per_example": "true"})
    assert all(settings_lib.get(f"ros_kd_{v}").same_run_as(per_example) is None for v in ("none", "sum1", "sumk"))


def test_default_settings_full_and_smoke():
    assert settings_lib.requested(PAPER) == [
        "baseline_i", "baseline_ii", "baseline_ii_subset", "baseline_iii", "baseline_iii_full", "baseline_iv",
        "ros_kd", "ros_kd_none", "ros_kd_sumk"]
    # The smoke leaves out the runs that only add run time: the variants and the five full-split teachers.
    assert settings_lib.requested(lesion.get_config(smoke=True)) == [
        "baseline_i", "baseline_ii", "baseline_ii_subset", "baseline_iii", "baseline_iv", "ros_kd"]
    assert settings_lib.requested(C.apply_overrides(PAPER, {"settings": "ros_kd_sum1"})) == ["ros_kd_sum1"]


def test_full_split_teacher_trains_on_the_whole_training_split(tmp_path):
    """Baseline II (the paper's) distils teachers/full_<arch>/, trained on every training example;
    the teachers stage trains it only for a setting that needs it."""
    tiny = {"teachers.architectures": "tiny_cnn,tiny_cnn", "teachers.single_teacher": "tiny_cnn",
            "distill.student": "tiny_cnn", "optim.epochs": "1", "optim.milestones": "", "distill.warmup_epochs": "0",
            "distill.rl_equal_epochs": "0"}
    cfg = C.apply_overrides(lesion.get_config(smoke=True), tiny)
    runner.run(cfg, tmp_path, stages=["data", "teachers"], settings=["baseline_i"])
    assert not (tmp_path / "teachers" / "full_tiny_cnn").exists()
    report = runner.run(cfg, tmp_path, stages=["data", "teachers", "settings", "report"],
                        settings=["baseline_ii", "baseline_iii_full"])
    train = report["data"]["split_sizes"]["train"]
    full = json.loads((tmp_path / "teachers" / "full_tiny_cnn" / "DONE.json").read_text())
    assert full["train_examples"] == train and full["index"] == "full"
    assert [t["train_examples"] for t in report["teachers"]] == [
        s["size"] for s in report["data"]["teacher_subsets"]] + [train]
    assert all(s["size"] < train for s in report["data"]["teacher_subsets"])
    for name in ("baseline_ii", "baseline_iii_full"):
        assert report["settings"][name]["teachers"] == ["tiny_cnn"]
    assert report["settings"]["baseline_ii_subset"]["status"] == "not run"
    assert report["settings"]["ros_kd_sum1"]["status"] == "= RoS-KD (M_smooth)"  # the default normalisation
