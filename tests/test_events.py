"""TensorBoard event files of `loop.fit` (rosjax.train.events): read back with TensorBoard's own
reader they hold the metrics.jsonl scalars; a resumed run adds a new file and leaves the old one."""
import json

import _train_worker as tw
import jax
import numpy as np
import pytest
from _tiny_student import tiny_student
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rosjax.distill.steps import DistillInputs, make_distill_step
from rosjax.distill.weighting import weight_rule
from rosjax.train import events, parallel


def _fit(workdir, epochs, **cfg):
    return tw.run_counting_fit(workdir, parallel.make_mesh(), epochs=epochs,
                               evaluate=tw.evaluate_state, cfg=tw.eval_loop_config(**cfg))


def _event_files(workdir):
    return sorted(workdir.glob("events.out.tfevents.*"))


def _scalars(path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _expected(records) -> dict[str, dict[int, float]]:
    want = {}
    for r in records:
        flat = {**events.flat_scalars(r["train"], "train"), **events.flat_scalars(r["val"], "val"),
                **events.flat_scalars({k: r[k] for k in ("lr", "images_per_s", "epoch_seconds",
                                                         "best_value") if k in r})}
        for tag, value in flat.items():
            want.setdefault(tag, {})[r["step"]] = value
    return want


def _assert_scalars_match(got, records):
    want = _expected(records)
    assert {"train/loss", "train/accuracy", "train/grad_norm", "val/score", "val/mean",
            "val/epochs", "lr", "images_per_s"} <= want.keys()
    for tag, by_step in want.items():
        assert got[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():  # event files store float32
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def test_event_file_scalars_equal_metrics_jsonl(tmp_path):
    _fit(tmp_path, 2)
    (path,) = _event_files(tmp_path)  # in the run's own folder, beside metrics.jsonl
    got = _scalars(path)
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    _assert_scalars_match(got, records)
    # The loss of every step (read every log_every_steps=2 steps), at update count 1..12.
    assert sorted(got["step/loss"]) == list(range(1, 2 * tw.STEPS_PER_EPOCH + 1))
    assert all(np.isfinite(v) for v in got["step/loss"].values())


def test_resume_opens_a_new_event_file_and_keeps_the_old_one(tmp_path):
    _fit(tmp_path, 1)
    (first,) = _event_files(tmp_path)
    before = first.read_bytes()
    _fit(tmp_path, 2)  # resumes at the end of epoch 1
    files = _event_files(tmp_path)
    assert len(files) == 2 and first in files
    assert first.read_bytes() == before  # never reopened
    (second,) = [f for f in files if f != first]
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    old, new = _scalars(first), _scalars(second)
    assert sorted(old["train/loss"]) == [tw.STEPS_PER_EPOCH]
    assert sorted(new["train/loss"]) == [2 * tw.STEPS_PER_EPOCH]
    merged = {tag: {**old.get(tag, {}), **new.get(tag, {})} for tag in old.keys() | new.keys()}
    _assert_scalars_match(merged, records)


def test_tensorboard_off_writes_no_event_file(tmp_path):
    _fit(tmp_path, 1, tensorboard=False)
    assert _event_files(tmp_path) == [] and len(_records(tmp_path)) == 1


def test_flat_scalars_keeps_finite_numbers_only():
    values = {"a": 1, "b": np.float32(2.5), "c": {"d": 3.0, "e": [1, 2]}, "f": None,
              "g": float("nan"), "h": "text", "i": True, "j": np.asarray(4.0)}
    assert events.flat_scalars(values, "val") == {"val/a": 1.0, "val/b": 2.5, "val/c/d": 3.0,
                                                  "val/j": 4.0}


@pytest.mark.parametrize("per_example", [False, True])
def test_distill_step_reports_each_teachers_mean_weight(per_example):
    k, b, c = 3, 8, 4
    state, batch = tiny_student(k, b, c, np.random.default_rng(0))
    step = jax.jit(make_distill_step((None,) * k, tau=2.0, alpha=0.5, multilabel=False, per_example=per_example))
    _, m = step(state, DistillInputs(teachers=(), rule=weight_rule("exponential", k, normalize="none")), batch,
                jax.random.key(1))
    means = np.array([float(m[f"weight_mean/t{i}"]) for i in range(k)])
    assert np.all(means > 0)
    np.testing.assert_allclose(means.sum(), float(m["weight_sum"]), rtol=1e-5)


class _FakeWandb:
    """Stands in for the `wandb` package: records what a run would send (nothing leaves the machine)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], {}, 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        for tag, value in values.items():
            self.logged.setdefault(tag, {})[step] = value

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_event_files_scalars(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    _fit(tmp_path, epochs=2, wandb_project="rosjax-test")
    assert [i["project"] for i in fake.inits] == ["rosjax-test"] and fake.finished == 1
    (event_file,) = _event_files(tmp_path)
    on_disk = _scalars(event_file)
    assert set(fake.logged) == set(on_disk)
    for tag, by_step in on_disk.items():
        assert fake.logged[tag].keys() == by_step.keys(), tag
        np.testing.assert_allclose([fake.logged[tag][s] for s in by_step], list(by_step.values()), rtol=1e-6)


def test_wandb_without_the_package_is_refused_at_start_up(monkeypatch):
    from experiments import lesion  # noqa: PLC0415
    from rosjax import config as C  # noqa: PLC0415
    from rosjax.experiment import validate  # noqa: PLC0415

    monkeypatch.setattr(validate.importlib.util, "find_spec", lambda name: None)
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"logging.wandb": "my-project"})
    with pytest.raises(validate.ConfigError, match=r"--logging.wandb=my-project: the wandb package is not installed"):
        validate.check_options(cfg, stages=["data"], settings=["ros_kd"], devices=1)
