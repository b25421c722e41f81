"""--seeds: per-seed runs in one work directory, Table I's mean ± std, the paired bootstrap intervals.

The unit tests score hand-made test outputs against scikit-learn and scipy.stats.bootstrap; the
end-to-end test runs a tiny lesion configuration (tiny_cnn teachers and students) over two seeds,
reruns it, and adds a third seed.
"""
from __future__ import annotations

import io
import json
import statistics

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, roc_auc_score

from experiments import lesion
from rosjax import config as C
from rosjax.experiment import runner, seeds
from rosjax.experiment.validate import ConfigError
from tests.test_experiment import tiny_config


def _store(root, name, logits, label):
    (root / "eval").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, logits=logits, label=label, loss=np.zeros(len(label)))
    (root / "eval" / f"{name}.test.npz").write_bytes(buffer.getvalue())


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sk_f1(y, prob):
    return f1_score(y, prob.argmax(axis=1), labels=np.unique(y), average="macro", zero_division=0)


def _sk_auroc(y, prob):
    return np.mean([roc_auc_score(y == c, prob[:, c]) for c in range(prob.shape[1])])


@pytest.fixture
def outputs(tmp_path):
    """Two seeds' test outputs of RoS-KD (informative) and baseline I (weaker) on one test set."""
    rng = np.random.default_rng(0)
    n, c = 150, 4
    y = rng.integers(0, c, n)
    logits = {}
    for s in (0, 1):
        logits[("ros_kd", s)] = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y]
        logits[("baseline_i", s)] = rng.normal(size=(n, c)) + 0.5 * np.eye(c)[y]
        for name in ("ros_kd", "baseline_i"):
            _store(tmp_path / f"s{s}", name, logits[(name, s)], y)
    return tmp_path, y, logits


def test_compare_estimates_the_seed_mean_difference_of_sklearn_scores(outputs):
    root, y, logits = outputs
    got = seeds.compare({0: root / "s0", 1: root / "s1"}, "ros_kd", ["baseline_i", "baseline_iii"], n_resamples=500)
    assert list(got["baselines"]) == ["baseline_i"]  # baseline III has no outputs
    c = got["baselines"]["baseline_i"]
    assert c["seeds"] == [0, 1]
    for metric, score in (("f1_macro", _sk_f1), ("auroc_macro", _sk_auroc)):
        want = np.mean([score(y, _softmax(logits[("ros_kd", s)])) - score(y, _softmax(logits[("baseline_i", s)]))
                        for s in (0, 1)])
        assert c[metric]["estimate"] == pytest.approx(want)
        assert c[metric]["low"] < c[metric]["estimate"] < c[metric]["high"]
        assert c[metric]["excludes_zero"] and c[metric]["low"] > 0  # a much better model


def test_compare_one_seed_matches_scipy_paired_percentile_bootstrap(outputs):
    """Other draws, the same bootstrap distribution: the endpoints agree within Monte Carlo error (~0.003)."""
    root, y, logits = outputs
    pm, pb = _softmax(logits[("ros_kd", 0)]), _softmax(logits[("baseline_i", 0)])
    got = seeds.compare({0: root / "s0"}, "ros_kd", ["baseline_i"], n_resamples=4000, seed=1)

    def f1(t, p):  # macro-F1 over the present classes, from confusion counts (sklearn's, checked above)
        return np.mean([2 * np.sum((t == k) & (p == k)) / (np.sum(t == k) + np.sum(p == k)) for k in np.unique(t)])

    ref = scipy.stats.bootstrap((y, pm.argmax(1), pb.argmax(1)), lambda t, a, b: f1(t, a) - f1(t, b),
                                paired=True, vectorized=False, method="percentile", n_resamples=4000,
                                random_state=np.random.default_rng(2))
    interval = got["baselines"]["baseline_i"]["f1_macro"]
    assert interval["low"] == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert interval["high"] == pytest.approx(ref.confidence_interval.high, abs=0.02)


def test_compare_pairs_the_models_on_the_same_resample(tmp_path):
    """Two models that differ on one of 200 examples: paired resamples give a difference within
    ±1/200-ish; independent resamples of the two would spread over ±0.1."""
    rng = np.random.default_rng(3)
    n, c = 200, 3
    y = rng.integers(0, c, n)
    base = rng.normal(size=(n, c)) + 1.0 * np.eye(c)[y]
    better = base.copy()
    wrong = np.flatnonzero(base.argmax(1) != y)[0]
    better[wrong, y[wrong]] = 10.0  # one more example right
    _store(tmp_path, "ros_kd", better, y)
    _store(tmp_path, "baseline_iii", base, y)
    interval = seeds.compare({0: tmp_path}, "ros_kd", ["baseline_iii"], n_resamples=500)["baselines"][
        "baseline_iii"]["f1_macro"]
    assert interval["estimate"] > 0 and interval["high"] - interval["low"] < 0.03


def test_compare_refuses_seeds_with_other_test_labels(outputs):
    root, y, logits = outputs
    _store(root / "s1", "ros_kd", logits[("ros_kd", 1)], np.roll(y, 1))
    with pytest.raises(ValueError, match="different test labels"):
        seeds.compare({0: root / "s0", 1: root / "s1"}, "ros_kd", ["baseline_i"], n_resamples=100)


def test_aggregate_takes_mean_and_sample_std_over_the_scored_seeds():
    def entry(f1, auroc, **extra):
        return {"title": "T", "test": {"f1_macro": f1, "auroc_macro": auroc, "multilabel": False,
                                       "per_class": {"a": {}}}, "wall_clock_s": 10.0, **extra}
    records = {0: {"ros_kd": entry(0.7, 0.8), "baseline_i": {"title": "B", "status": "not run"}},
               1: {"ros_kd": entry(0.6, None, collapsed={"constant": "one class"}), "baseline_i": {"title": "B"}},
               2: {"ros_kd": entry(0.8, 0.9), "baseline_i": {"title": "B"}},
               3: {"ros_kd": {"title": "T", "status": "not run"}, "baseline_i": {"title": "B"}}}
    out = seeds.aggregate(records)
    r = out["ros_kd"]
    assert r["test"]["f1_macro"] == pytest.approx(0.7) and r["test_std"]["f1_macro"] == pytest.approx(
        statistics.stdev([0.7, 0.6, 0.8]))
    assert r["test"]["auroc_macro"] == pytest.approx(0.85) and r["test_std"]["auroc_macro"] == pytest.approx(
        statistics.stdev([0.8, 0.9]))
    assert "multilabel" not in r["test"] and "per_class" not in r["test"]  # not averaged; in per_seed
    assert r["seeds"] == [0, 1, 2] and r["status"] == "3 of 4 seeds" and r["per_seed"]["1"]["f1_macro"] == 0.6
    assert r["collapsed"] == {"seed 1: constant": "one class"}
    assert out["baseline_i"] == {"title": "B", "status": "not run"}


def test_seeds_are_checked_at_start_up(tmp_path):
    for override, message in (({"seeds": "0,0"}, "distinct"), ({"seeds": "1,2"}, "must include --seed=0"),
                              ({"seeds": "0,-1"}, "distinct seeds >= 0"),
                              ({"evaluation.bootstrap_resamples": "50"}, "must be >= 100")):
        cfg = C.apply_overrides(lesion.get_config(smoke=True), override)
        with pytest.raises(ConfigError, match=message):
            runner.check(cfg, tmp_path, stages=["data"], settings=[])


# --- end to end -------------------------------------------------------------------------------


def _done_times(root):
    """{DONE.json path: mtime} of every finished teacher and setting under `root`."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("DONE.json")}


def test_two_seeds_then_a_third(tmp_path):
    stages = ["data", "teachers", "settings", "evaluate", "report"]
    settings = ["baseline_i", "ros_kd"]
    cfg = tiny_config(lesion.get_config, seeds="0,1", settings="baseline_i,ros_kd",
                      **{"evaluation.bootstrap_resamples": "200"})
    report = runner.run(cfg, tmp_path, stages=stages, settings=settings)
    # seed 0 is the work directory itself, seed 1 a nested one with its own config and teachers
    assert json.loads((tmp_path / "seeds" / "1" / "config.json").read_text())["seed"] == 1
    for root in (tmp_path, tmp_path / "seeds" / "1"):
        assert all((root / "teachers" / f"{i}-tiny_cnn" / "DONE.json").exists() for i in range(3))
        assert (root / "eval" / "ros_kd.test.npz").exists() and (root / "settings" / "ros_kd" / "DONE.json").exists()
    assert not (tmp_path / "seeds" / "0").exists()

    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["seeds"] == [0, 1]
    ros = stored["settings"]["ros_kd"]
    per_seed = [json.loads((root / "eval" / "ros_kd.json").read_text())["test"]["f1_macro"]
                for root in (tmp_path, tmp_path / "seeds" / "1")]
    assert [ros["per_seed"][s]["f1_macro"] for s in ("0", "1")] == per_seed
    assert ros["test"]["f1_macro"] == pytest.approx(np.mean(per_seed))
    assert ros["test_std"]["f1_macro"] == pytest.approx(np.std(per_seed, ddof=1))
    compared = stored["comparisons"]["baselines"]
    assert set(compared) == {"baseline_i", "baseline_v"} and compared["baseline_i"]["seeds"] == [0, 1]
    assert compared["baseline_i"]["f1_macro"]["estimate"] == pytest.approx(np.mean(
        [per_seed[i] - json.loads((root / "eval" / "baseline_i.json").read_text())["test"]["f1_macro"]
         for i, root in enumerate((tmp_path, tmp_path / "seeds" / "1"))]))
    markdown = (tmp_path / "report.md").read_text()
    assert " ± " in markdown and "against each baseline" in markdown and "own teachers" in markdown
    assert report["settings"]["ros_kd"]["seeds"] == [0, 1]

    before = _done_times(tmp_path)
    old_outputs = tmp_path / "seeds" / "1" / "eval" / "baseline_i.test.npz"  # as if scored before they were stored
    old_outputs.unlink()
    again = runner.run(cfg, tmp_path, stages=stages, settings=settings)  # resumes: nothing retrained
    assert _done_times(tmp_path) == before and again["settings"] == report["settings"]
    assert old_outputs.exists() and again["comparisons"] == report["comparisons"]  # re-inferred, same numbers

    three = C.apply_overrides(cfg, {"seeds": "0,1,2"})
    report3 = runner.run(three, tmp_path, stages=stages, settings=settings)
    after = _done_times(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("seeds/2/")} == before
    assert {k for k in after if k.startswith("seeds/2/")} == {
        *(f"seeds/2/teachers/{i}-tiny_cnn/DONE.json" for i in range(3)),
        "seeds/2/settings/baseline_i/DONE.json", "seeds/2/settings/ros_kd/DONE.json"}
    assert report3["settings"]["ros_kd"]["seeds"] == [0, 1, 2]
    assert report3["comparisons"]["baselines"]["baseline_i"]["seeds"] == [0, 1, 2]
