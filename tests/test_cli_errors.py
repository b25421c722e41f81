"""Bad options and bad states get one clear line and exit status 2, before anything is written.

Each case is a mistake a user makes (the reliability issue's list): an option outside its range,
a setting or architecture that does not exist, a warm-up longer than the run, a batch that
does not split over the devices, sweep points too small for a batch, a rerun with other
options, a damaged config.json. The in-process cases see the 4 fake CPU devices of
tests/conftest.py.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import lesion
from rosjax import config as C
from rosjax.experiment import cli, runner, validate
from rosjax.experiment import settings as settings_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(tmp_path, *argv):
    workdir = tmp_path / "work"
    return cli.main(lesion.get_config, ["--smoke", "--workdir", str(workdir), *argv]), workdir


@pytest.mark.parametrize("option, culprit", [
    ("--distill.tau=0", "--distill.tau=0.0: the temperature must be > 0"),
    ("--distill.alpha=2", "--distill.alpha=2.0: must be in [0, 1]"),
    ("--distill.normalize=sum_1", "--distill.normalize=sum_1: expected one of"),
    ("--distill.warmup_epochs=3", "--distill.warmup_epochs=3: must be in 0..2"),
    ("--distill.recalibration_batches=-1", "--distill.recalibration_batches=-1: must be >= 0"),
    ("--optim.learning_rate=-0.1", "--optim.learning_rate=-0.1: must be >= 0"),
    ("--optim.epochs=0", "--optim.epochs=0: must be >= 1"),
    ("--optim.batch_size=0", "--optim.batch_size=0: must be >= 1"),
    ("--optim.batch_size=18", "--optim.batch_size=18: must divide by the 4 devices"),
    ("--data.eval_batch_size=30", "--data.eval_batch_size=30: must divide by the 4 devices"),
    ("--optim.milestones=2,9", "--optim.milestones=2,9: increasing epochs in 1..3"),
    ("--distill.student=resnet19", "--distill.student=resnet19: expected one of resnet18"),
    ("--teachers.architectures=resnet18,vgg16,densenet21", "--teachers.architectures=vgg16: expected one of"),
    ("--sweeps.normalizations=none,per_step", "--sweeps.normalizations=per_step: expected one of"),
    ("--sweeps.fold_student=vgg16", "--sweeps.fold_student=vgg16: expected one of"),
    # Per-example draws are not a normalisation: they have their own sweep field.
    ("--sweeps.normalizations=none,per_example", "--sweeps.normalizations=per_example: expected one of none, sum1"),
    ("--sweeps.per_example_normalizations=sum2", "--sweeps.per_example_normalizations=sum2: expected one of"),
    ("--distill.rl_baseline_decay=1", "--distill.rl_baseline_decay=1.0: must be in [0, 1)"),
    ("--distill.rl_embedding_teacher=5", "--distill.rl_embedding_teacher=5: a teacher index in -5..4"),
    ("--settings=baseline_i,baseline_vi", "--settings=baseline_vi: unknown setting"),
    ("--data.noise=symmetric", None),  # valid with a rate: the control case
    ("--data.noise_rate=0.3", "--data.noise_rate=0.3: needs --data.noise"),
    ("--data.noise=flip", "--data.noise=flip: isic2019 takes symmetric or pair noise"),
    ("--dtype=float16", "--dtype=float16: expected one of float32, bfloat16"),
    ("--model_width=0", "--model_width=0.0: a channel multiplier in (0, 4]"),
    ("--optim.clip_grad_norm=-1", "--optim.clip_grad_norm=-1.0: must be >= 0"),
    ("--teachers.pretrained=a.npz,,,,", "--teachers.pretrained=a.npz: no such file"),
    ("--distill.pretrained=a.npz", "--distill.pretrained=a.npz: no such file"),
    ("--data.download=sometimes", "--data.download=sometimes: expected one of auto, never"),
    ("--data.augment_on=gpu", "--data.augment_on=gpu: expected one of auto, device, host"),
])
def test_a_bad_option_is_one_line_and_status_2_before_anything_is_written(tmp_path, capsys, option, culprit):
    # "--stage data" keeps the valid control case short; the checks cover every stage's options.
    status, workdir = run_cli(tmp_path, option, "--stage", "data", f"--data.data_dir={tmp_path / 'tfds'}")
    err = capsys.readouterr().err
    if culprit is None:
        assert status == 0, err
        return
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {line}" for line in lines[0][7:].splitlines()] and len(lines) == 1, err
    assert culprit in lines[0]
    assert "Traceback" not in err
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_weight_files_are_refused_for_a_scaled_width(tmp_path, capsys):
    """The smoke's networks are a quarter wide; a torchvision file holds width-1.0 shapes."""
    weights = tmp_path / "resnet18.npz"
    weights.write_bytes(b"")
    status, workdir = run_cli(tmp_path, f"--distill.pretrained={weights}", "--stage", "data")
    err = capsys.readouterr().err
    assert status == 2 and "--model_width=0.25: torchvision weight files" in err and "Traceback" not in err
    assert not workdir.exists()


def test_a_model_too_deep_for_the_crops_is_refused_wherever_it_is_named(tmp_path, capsys):
    """DenseNet's logits are NaN below 29 px: refused before the other teachers train for nothing.
    The smoke names densenet21 as a teacher and as the student sweep's second student."""
    status, workdir = run_cli(tmp_path, "--data.image_size=24", "--stage", "data")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert status == 2 and not workdir.exists()
    assert [line.split(":")[1] for line in lines] == [" --teachers.architectures=densenet21",
                                                      " --sweeps.students=densenet21"]
    assert all("needs crops of at least 29 px (--data.image_size=24)" in line for line in lines)


def test_every_bad_option_is_named_at_once(tmp_path, capsys):
    status, _ = run_cli(tmp_path, "--distill.tau=0", "--distill.alpha=2", "--optim.epochs=0")
    assert status == 2
    named = [line.split("=")[0] for line in capsys.readouterr().err.splitlines()]
    assert named == ["error: --optim.epochs", "error: --distill.tau", "error: --distill.alpha"]


def test_top_level_fields_are_options():
    cfg, *_ = cli.parse_args(["--dtype=bfloat16", "--seed", "3", "--settings=baseline_i,rosjax",
                              "--checkpoint_every_steps=7"], lesion.get_config)
    assert (cfg.dtype, cfg.seed, cfg.settings, cfg.checkpoint_every_steps) == (
        "bfloat16", 3, ("baseline_i", "ros_kd"), 7)  # "rosjax": the 0.1 name, accepted


def test_usage_names_the_module_the_user_ran():
    done = subprocess.run([sys.executable, "-m", "experiments.lesion", "--help"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m experiments.lesion ")


def test_a_rerun_may_move_paths_but_not_change_results(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    status, workdir = run_cli(tmp_path, "--stage", "data", f"--data.data_dir={data_dir}")
    assert status == 0
    moved = tmp_path / "moved"
    data_dir.rename(moved)
    status, _ = run_cli(tmp_path, "--stage", "data", f"--data.data_dir={moved}", "--log_every_steps=9",
                        "--data.num_workers=1")
    assert status == 0, capsys.readouterr().err
    assert json.loads((workdir / "config.json").read_text())["data"]["data_dir"] == str(moved)
    capsys.readouterr()
    status, _ = run_cli(tmp_path, "--stage", "data", f"--data.data_dir={moved}", "--distill.tau=2")
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "distill.tau 0.5 -> 2.0" in err and "another configuration" in err


def test_a_damaged_config_json_is_named(tmp_path, capsys):
    status, workdir = run_cli(tmp_path, "--stage", "data", f"--data.data_dir={tmp_path / 'tfds'}")
    assert status == 0
    (workdir / "config.json").write_text('{"name": "lesion", ')
    status, _ = run_cli(tmp_path, "--stage", "data", f"--data.data_dir={tmp_path / 'tfds'}")
    err = capsys.readouterr().err
    assert status == 2 and f"{workdir / 'config.json'} is damaged" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    status, _ = run_cli(tmp_path, "--distill.tau=0", "--debug")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" in err and "ConfigError" in err


def test_sweep_points_and_folds_too_small_for_a_batch_are_refused_at_start_up():
    """At overlap 0 five teachers share 77 rows: 15 or 16 each, fewer than a batch of 16."""
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"sweeps.overlaps": "0.0,0.4", "sweeps.fold_seeds": "0,1"})

    class Data:  # what check_batches reads: the split and the teacher subsets
        def __init__(self, subset_sizes, train=77):
            self.splits = {"train": np.arange(train), "validation": np.arange(10), "test": np.arange(20)}
            self.subsets = tuple(np.arange(n) for n in subset_sizes)

    points = {None: Data([41, 40, 40, 40, 40]), 0.0: Data([16, 16, 15, 15, 15])}

    def load(split_seed=None, overlap=None):
        return points[overlap] if split_seed is None else Data([8, 40, 40, 40, 40], train=60)

    validate.check_batches(cfg, load, stages=["data", "teachers"])  # the main run alone is fine
    with pytest.raises(validate.ConfigError) as err:
        validate.check_batches(cfg, load, stages=["sweeps", "folds"])
    assert err.value.problems == [
        "--optim.batch_size=16: overlap sweep point p=0: teacher 2's subset has 15; teacher 3's subset has 15; "
        "teacher 4's subset has 15 examples, fewer than one batch; lower --optim.batch_size or drop that point",
        "--optim.batch_size=16: fold with split seed 1: teacher 0's subset has 8 examples, fewer than one batch; "
        "lower --optim.batch_size or drop that point"]


def test_the_library_leaves_the_root_logger_alone(tmp_path):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"data.data_dir": str(tmp_path / "tfds")})
    runner.run(cfg, tmp_path / "work", stages=["data"], settings=settings_lib.requested(cfg))
    assert (list(root.handlers), root.level) == before


def test_two_jobs_cannot_train_one_stage_at_once(tmp_path):
    from rosjax.experiment.workdir import StageBusyError, StageClaim  # noqa: PLC0415

    first = StageClaim(tmp_path)
    with pytest.raises(StageBusyError, match=f"another job is running {tmp_path}"):
        StageClaim(tmp_path)
    first.release()
    StageClaim(tmp_path).release()  # free again once the first job let go


def test_a_stage_runs_once_under_its_claim(tmp_path):
    """claim_unless_done: None and the claim while the stage is to run (released after, also on
    an error), the DONE record without a claim once it finished."""
    from rosjax.experiment.workdir import StageBusyError, StageClaim, claim_unless_done, mark_done  # noqa: PLC0415

    with claim_unless_done(tmp_path) as record:
        assert record is None
        with pytest.raises(StageBusyError):
            StageClaim(tmp_path)  # another job is refused while the stage runs
        mark_done(tmp_path, {"epochs": 3})
    (tmp_path / "other").mkdir()
    with pytest.raises(RuntimeError, match="crash"), claim_unless_done(tmp_path / "other") as record:
        raise RuntimeError("crash")
    StageClaim(tmp_path / "other").release()  # the crashed block let go of its claim
    first = StageClaim(tmp_path)  # a finished stage is read without claiming it
    with claim_unless_done(tmp_path) as record:
        assert record == {"epochs": 3}
    first.release()


def test_concurrent_json_writes_never_collide(tmp_path):
    """Jobs sharing a work directory rewrite data/summary.json at once: each write is whole."""
    import threading  # noqa: PLC0415

    from rosjax.experiment.workdir import read_json, write_json  # noqa: PLC0415

    path = tmp_path / "summary.json"
    errors = []

    def writer(k):
        try:
            for i in range(50):
                write_json(path, {"writer": k, "i": i, "pad": "x" * 10_000})
        except OSError as err:  # a shared temporary name fails here
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and read_json(path)["i"] == 49
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_field_added_after_the_run_started_does_not_block_resuming(tmp_path):
    """A work directory recorded before `data.views` existed resumes while the field keeps its default."""
    from rosjax.experiment.workdir import WorkdirConflictError, check_config  # noqa: PLC0415

    cfg = lesion.get_config(smoke=True)
    recorded = C.to_dict(cfg)
    del recorded["data"]["views"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    check_config(tmp_path, C.to_dict(cfg), write=False)  # the default: same results as before
    with pytest.raises(WorkdirConflictError, match="data.views None -> 'PA'"):
        check_config(tmp_path, C.to_dict(C.apply_overrides(cfg, {"data.views": "PA"})), write=False)
