"""The experiment layer: config overrides, CLI, work-directory rules, and whole runs.

The end-to-end runs use the bundled sample files with `tiny_cnn` teachers and students, so every
stage (data, teachers, all settings, evaluation, report) runs in well under a minute; the real
architectures are exercised by tests/test_smoke_lesion.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import lesion, nih_cxr
from rosjax import config as C
from rosjax.experiment import cli, runner, sweeps
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.validate import ConfigError
from rosjax.experiment.workdir import Workdir, WorkdirConflictError, check_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"teachers.architectures": "tiny_cnn,tiny_cnn,tiny_cnn", "teachers.single_teacher": "tiny_cnn",
        "distill.student": "tiny_cnn", "optim.epochs": "3", "distill.warmup_epochs": "1",
        "sweeps.overlaps": "0.0,0.4", "sweeps.students": "tiny_cnn", "sweeps.normalizations": "none,sum1",
        "sweeps.fold_seeds": "0,1", "sweeps.fold_student": "tiny_cnn"}


def tiny_config(get_config, **extra):
    return C.apply_overrides(get_config(smoke=True), {**TINY, **extra})


def tiny_argv(**extra):
    return [f"--{k}={v}" for k, v in {**TINY, **extra}.items()]


# --- config and CLI ---------------------------------------------------------------------------


def test_overrides_parse_by_field_type():
    cfg = C.apply_overrides(lesion.get_config(), {
        "optim.epochs": "7", "distill.tau": "2.5", "data.labels": "A, B", "distill.normalize": "none",
        "distill.per_example": "true", "optim.milestones": "3,5"})
    assert (cfg.optim.epochs, cfg.distill.tau, cfg.data.labels) == (7, 2.5, ("A", "B"))
    assert cfg.distill.normalize == "none" and cfg.distill.per_example is True  # the paper's Exp(1)
    assert cfg.optim.milestones == (3, 5)


@pytest.mark.parametrize("override, message", [
    ({"optim.epoch": "3"}, "unknown option 'epoch'"),
    ({"optim.epochs": "three"}, "expected int, got 'three'"),
    ({"distill.per_example": "maybe"}, "expected bool"),
    ({"optim": "3"}, "names a whole section"),
])
def test_bad_overrides_name_the_option(override, message):
    with pytest.raises(ValueError, match=message):
        C.apply_overrides(lesion.get_config(), override)


def test_config_json_round_trip():
    cfg = nih_cxr.get_config(smoke=True)
    assert C.from_dict(C.ExperimentConfig, json.loads(json.dumps(C.to_dict(cfg)))) == cfg


def test_paper_values_are_the_defaults():
    cfg = lesion.get_config()
    assert (cfg.optim.learning_rate, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 2e-4)
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.milestones) == (50, 64, (25, 40))
    assert (cfg.distill.tau, cfg.distill.alpha, cfg.distill.warmup_epochs) == (0.5, 0.9, 10)
    assert (cfg.teachers.overlap, len(cfg.teachers.architectures)) == (0.4, 5)
    assert cfg.distill.weighting == "exponential"
    # Deliberate deviation: Exp(1) draws divided by their sum (baseline III's KD strength); the
    # paper's unnormalised formula collapsed the student at the same learning rate (README).
    assert cfg.distill.normalize == "sum1"


def test_weight_sweep_points_vary_the_normalisation_and_the_draws():
    """Per-step draws under each normalisation, then per-example draws: today's four variants."""
    assert sweeps.weight_points(C.SweepConfig()) == {
        "none": ("none", False), "sum1": ("sum1", False), "sumk": ("sumk", False), "per_example_sum1": ("sum1", True)}
    smoke = lesion.get_config(smoke=True).sweeps  # one trained point: the main run is sum1, per step
    assert sweeps.weight_points(smoke) == {"none": ("none", False), "sum1": ("sum1", False)}


def test_cli_stages_and_teacher_option():
    cfg, workdir, stages, settings, teacher, _ = cli.parse_args(["--smoke", "--stage", "rosjax,report"],
                                                                 lesion.get_config)
    assert stages == ["settings", "report"] and settings == ["ros_kd"] and teacher is None  # "rosjax": alias
    assert workdir == "work/lesion-smoke" and cfg.smoke
    _, _, stages, _, teacher, _ = cli.parse_args(["--teacher", "2"], lesion.get_config)
    assert stages == ["data", "teachers"] and teacher == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["--teacher", "5"], lesion.get_config)
    with pytest.raises(SystemExit):
        cli.parse_args(["--stage", "teachrs"], lesion.get_config)


def test_workdir_refuses_another_configuration(tmp_path):
    wd = Workdir(tmp_path)
    cfg = lesion.get_config(smoke=True)
    check_config(wd.root, C.to_dict(cfg))
    check_config(wd.root, C.to_dict(cfg))  # same config: fine
    other = C.apply_overrides(cfg, {"distill.tau": "4"})
    with pytest.raises(WorkdirConflictError, match="distill.tau"):
        check_config(wd.root, C.to_dict(other))


# --- whole runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    """A straight tiny lesion run of every stage but the sweeps; returns (workdir, report)."""
    workdir = tmp_path_factory.mktemp("lesion")
    cfg = tiny_config(lesion.get_config)
    report = runner.run(cfg, workdir, stages=["data", "teachers", "settings", "evaluate", "report"],
                        settings=settings_lib.requested(cfg))
    return workdir, report


def test_lesion_run_reports_every_setting(lesion_run):
    workdir, report = lesion_run
    settings = report["settings"]
    for name in ("baseline_i", "baseline_ii", "baseline_ii_subset", "baseline_iii", "baseline_iv", "baseline_v",
                 "ros_kd"):  # the smoke's settings (not the five full-split teachers' traditional baseline III)
        test = settings[name]["test"]
        assert 0.0 <= test["f1_macro"] <= 1.0 and test["num_examples"] == report["data"]["split_sizes"]["test"]
    assert set(report["data"]["group_overlap"].values()) == {0}
    assert [t["architecture"] for t in report["teachers"]] == ["tiny_cnn"] * 4  # 3 subset teachers, 1 full-split
    assert report["teachers"][-1]["train_examples"] == report["data"]["split_sizes"]["train"]
    assert set(report["robustness"]) and set(report["landscape"]) == {"baseline_iii", "ros_kd"}
    markdown = (workdir / "report.md").read_text()
    assert "Table I" in markdown and "Table II" in markdown and "RoS-KD (M_smooth)" in markdown
    assert (workdir / "plots" / "landscape_ros_kd_contour.png").stat().st_size > 0


def test_rerun_skips_finished_stages(lesion_run):
    workdir, report = lesion_run
    cfg = tiny_config(lesion.get_config)
    started = time.perf_counter()
    again = runner.run(cfg, workdir, stages=["data", "teachers", "settings", "evaluate", "report"],
                       settings=settings_lib.requested(cfg))
    assert time.perf_counter() - started < 60
    assert again["settings"] == report["settings"]


def test_killed_run_resumes_to_the_same_report(lesion_run, tmp_path):
    """kill -9 in the middle of the RoS-KD student's training, rerun: the same numbers."""
    reference_dir, reference = lesion_run
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "experiments.lesion", "--smoke", "--workdir", str(workdir),
               "--stage", "data,teachers,settings,evaluate,report", *tiny_argv()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed-run.log"  # a file, not a pipe: nobody reads the log while we poll
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    ckpt = workdir / "settings" / "ros_kd" / "ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "settings" / "ros_kd" / "DONE.json").exists()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((workdir / "report.json").read_text())
    for name in ("baseline_v", "ros_kd", "baseline_iii"):
        for key in ("f1_macro", "precision_macro", "recall_macro", "accuracy"):
            assert resumed["settings"][name]["test"][key] == pytest.approx(
                reference["settings"][name]["test"][key], abs=1e-6), (name, key)


def test_nih_run_with_sweeps_and_folds(tmp_path):
    """Multi-label path end to end, with the sweeps and the three-run AUROC table."""
    cfg = tiny_config(nih_cxr.get_config, settings="baseline_iii,rosjax")
    report = runner.run(cfg, tmp_path, stages=["data", "teachers", "settings", "evaluate", "sweeps", "folds",
                                               "report"], settings=settings_lib.requested(cfg))
    assert report["data"]["multilabel"] and len(report["data"]["class_names"]) == 8
    assert report["settings"]["ros_kd"]["test"]["num_classes"] == 8
    assert len(report["settings"]["ros_kd"]["test_tuned"]["thresholds"]) == 8  # tuned on validation
    assert report["settings"]["baseline_i"]["status"] == "not run"
    assert set(report["sweeps"]) == {"overlap", "student", "weights"}
    assert set(report["sweeps"]["overlap"]["points"]) == {"0.0", "0.4"}
    folds = report["folds"]
    assert folds["runs"] == 2 and len(folds["auroc_mean"]) == 8
    markdown = (tmp_path / "report.md").read_text()
    assert "Table III" in markdown and "Sweep" in markdown and "Multi-label decision thresholds" in markdown
    # Every sweep point and fold is a finished stage now: a rerun only reads them back.
    started = time.perf_counter()
    again = runner.run(cfg, tmp_path, stages=["sweeps", "folds", "report"], settings=settings_lib.requested(cfg))
    assert again["sweeps"] == report["sweeps"] and again["folds"] == report["folds"]
    assert time.perf_counter() - started < 60


def test_missing_nih_table_is_a_clear_error(tmp_path, capsys):
    status = cli.main(nih_cxr.get_config, ["--workdir", str(tmp_path / "w"), f"--data.data_dir={tmp_path / 'tfds'}",
                                           f"--data.manual_dir={tmp_path / 'empty'}", "--stage", "data"])
    assert status == 2
    err = capsys.readouterr().err
    assert "Data_Entry_2017" in err and "Traceback" not in err


def test_cached_teacher_outputs_train_the_same_student(lesion_run, tmp_path):
    """With as many stored views as epochs, the cached run replays the online run's batches and
    teacher logits, so baseline III's student ends where the online one did."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from rosjax.experiment.artifacts import load_setting  # noqa: PLC0415

    reference_dir, _ = lesion_run
    cfg = tiny_config(lesion.get_config, **{"distill.teacher_outputs": "cached", "distill.cache_views": "3",
                                            "distill.cache_batch_size": "32"})
    report = runner.run(cfg, tmp_path, stages=["data", "teachers", "settings", "evaluate", "report"],
                        settings=["baseline_iii"])
    assert report["settings"]["baseline_iii"]["teacher_outputs"] == "cached"
    _, cached, _ = load_setting(tmp_path, "baseline_iii")
    _, online, _ = load_setting(reference_dir, "baseline_iii")
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(online)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_teachers_start_from_given_weights(tmp_path):
    """--teachers.pretrained: a teacher starts from the file's weights (lr 0 keeps them to the end)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from rosjax import models  # noqa: PLC0415
    from rosjax.experiment.artifacts import load_setting  # noqa: PLC0415
    from rosjax.models import pretrained  # noqa: PLC0415

    model = models.create("resnet18", 8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    weights["batch_stats"] = jax.tree.map(np.abs, weights["batch_stats"])  # variances must be positive
    path = tmp_path / "resnet18.npz"
    pretrained.save_torchvision_weights("resnet18", weights, path)

    cfg = tiny_config(lesion.get_config, **{"teachers.architectures": "resnet18,tiny_cnn", "model_width": "1",
                                            "teachers.pretrained": f"{path},", "optim.learning_rate": "0",
                                            "optim.weight_decay": "0", "optim.epochs": "1",
                                            "optim.milestones": "", "distill.warmup_epochs": "0",
                                            "distill.rl_equal_epochs": "0"})
    with pytest.raises(ConfigError, match="no such file"):
        runner.run(C.apply_overrides(cfg, {"teachers.pretrained": "missing.npz,"}), tmp_path / "bad",
                   stages=["teachers"], settings=[])
    runner.run(cfg, tmp_path / "run", stages=["data", "teachers"], settings=[])
    _, trained, _ = load_setting(tmp_path / "run", "teacher:0")
    np.testing.assert_array_equal(np.asarray(trained["params"]["conv1"]["kernel"]),
                                  weights["params"]["conv1"]["kernel"])


def test_students_start_from_given_weights(tmp_path):
    """--distill.pretrained: the students (KD and RL trainers) start from the file's weights (lr 0 keeps them)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from rosjax import models  # noqa: PLC0415
    from rosjax.experiment.artifacts import load_setting  # noqa: PLC0415
    from rosjax.models import pretrained  # noqa: PLC0415

    model = models.create("tiny_cnn", 8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    rng = np.random.default_rng(1)
    weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    weights["batch_stats"] = jax.tree.map(np.abs, weights["batch_stats"])  # variances must be positive
    path = tmp_path / "tiny.npz"
    pretrained.save_torchvision_weights("tiny_cnn", weights, path)

    # Width 1: the file holds a width-1 tiny_cnn, and the smoke's quarter width would be refused.
    cfg = tiny_config(lesion.get_config, **{"teachers.architectures": "tiny_cnn", "distill.pretrained": str(path),
                                            "model_width": "1", "optim.learning_rate": "0", "optim.weight_decay": "0",
                                            "optim.epochs": "1", "optim.milestones": "",
                                            "distill.warmup_epochs": "0", "distill.rl_equal_epochs": "0"})
    with pytest.raises(ConfigError, match="distill.pretrained=missing.npz: no such file"):
        runner.run(C.apply_overrides(cfg, {"distill.pretrained": "missing.npz"}), tmp_path / "bad",
                   stages=["settings"], settings=["baseline_i"])
    runner.run(cfg, tmp_path / "run", stages=["data", "teachers", "settings"], settings=["baseline_i", "baseline_iv"])
    for setting in ("baseline_i", "baseline_iv"):
        _, trained, _ = load_setting(tmp_path / "run", setting)
        for layer in trained["params"]:
            for name, value in trained["params"][layer].items():
                np.testing.assert_array_equal(np.asarray(value), weights["params"][layer][name], err_msg=setting)
