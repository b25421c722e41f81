"""The noisy-label study (experiments.noise_study) and --data.noise_validation.

The end-to-end test runs the smoke variant with tiny_cnn models, two rates, two seeds and 96
generated images, then checks every table cell against the per-run eval JSONs (mean and sample
std computed here with `statistics`), the PNG, and that a rerun retrains nothing.
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics

import numpy as np
import PIL.Image
import pytest

from experiments import lesion, noise_study
from rosjax import config as C
from rosjax.data import noise
from rosjax.experiment import data as data_lib
from rosjax.experiment import runner
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.validate import ConfigError

QUICK = ["--rates=0,0.4", "--seeds=0,1", "--per_class=12", "--optim.epochs=2", "--optim.milestones=1",
         "--distill.warmup_epochs=1", "--distill.rl_equal_epochs=1", "--evaluation.bootstrap_resamples=200"]


def _cells(markdown: str, heading: str) -> dict[str, list[str]]:
    """Row title -> cells of the first table after `heading`."""
    section = markdown.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| Setting") and not line.startswith("| Baseline |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def _done_times(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("DONE.json")}


def test_smoke_study_table_matches_the_per_run_results(tmp_path):
    argv = ["--smoke", "--workdir", str(tmp_path), *QUICK]
    assert noise_study.main(argv) == 0
    markdown = (tmp_path / "noise_study.md").read_text()
    table = _cells(markdown, "## Test macro-F1")
    shown = settings_lib.evaluated(list(noise_study.get_config(smoke=True).settings))
    assert len(shown) >= 3 and set(table) == {settings_lib.get(s).title for s in shown}
    stored = json.loads((tmp_path / "noise_study.json").read_text())
    for column, rate in enumerate(("0", "0.4")):
        root = tmp_path / f"noise_{rate}"
        for name in shown:
            per_seed = [json.loads((r / "eval" / f"{name}.json").read_text())["test"]["f1_macro"]
                        for r in (root, root / "seeds" / "1")]
            mean, std = statistics.mean(per_seed), statistics.stdev(per_seed)
            assert table[settings_lib.get(name).title][column].split(" ⚠")[0] == f"{mean:.3f} ± {std:.3f}"
            cell = stored["settings"][name]["rates"][rate]
            assert cell["mean"] == pytest.approx(mean) and cell["std"] == pytest.approx(std)
            assert cell["per_seed"] == {"0": per_seed[0], "1": per_seed[1]}
        split = json.loads((root / "data" / "split.json").read_text())
        changed = 0 if split["noise"] is None else len(split["noise"]["rows"])
        assert stored["noise"]["measured"][rate]["train"] == pytest.approx(changed / len(split["splits"]["train"]))
        assert stored["noise"]["measured"][rate]["validation"] == 0.0  # clean validation labels by default
    assert stored["noise"]["measured"]["0"]["train"] == 0.0
    assert 0.2 < stored["noise"]["measured"]["0.4"]["train"] < 0.6
    assert "validation labels clean" in markdown and "symmetric" in markdown
    assert re.search(r"96 images, 12 per class", markdown)
    assert not (tmp_path / "noise_0" / "eval" / "robustness.json").exists()  # test metrics only
    with PIL.Image.open(tmp_path / "noise_study.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        image.verify()

    before = _done_times(tmp_path)
    assert len(before) == 2 * 2 * (3 + 3)  # rates x seeds x (teachers + trained settings)
    assert noise_study.main(argv) == 0
    assert _done_times(tmp_path) == before


def test_bad_rates_and_a_user_noise_rate_are_refused(tmp_path, capsys):
    assert noise_study.main(["--smoke", "--workdir", str(tmp_path), "--rates=0,1.5"]) == 2
    assert "--rates=0,1.5: distinct noise rates in [0, 1]" in capsys.readouterr().err
    assert noise_study.main(["--smoke", "--workdir", str(tmp_path), "--data.noise_rate=0.3"]) == 2
    assert "use --rates" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_rate_config_picks_the_noise_of_the_task():
    one = noise_study.rate_config(noise_study.get_config(smoke=True), 0.2)
    multi = noise_study.rate_config(noise_study.get_config(smoke=True, dataset="nih_chestxray14"), 0.4)
    assert (one.data.noise, one.data.noise_rate) == ("symmetric", 0.2)
    assert (multi.data.noise, multi.data.noise_rate) == ("flip", 0.4)


@pytest.fixture(scope="module")
def noisy_cfg():
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"data.noise": "symmetric", "data.noise_rate": "0.4"})
    return cfg


def test_noise_validation_makes_validation_labels_equally_noisy(noisy_cfg):
    plain = data_lib.load(noisy_cfg)
    both = data_lib.load(dataclasses.replace(noisy_cfg, data=dataclasses.replace(noisy_cfg.data,
                                                                                 noise_validation=True)))
    stored = plain.dataset.labels
    injected = noise.add_label_noise(stored, mode="symmetric", rate=0.4, seed=noisy_cfg.seed, num_classes=8).noisy
    train, val, test = (plain.splits[s] for s in ("train", "validation", "test"))
    np.testing.assert_array_equal(both.train_labels[train], plain.train_labels[train])  # same training noise
    np.testing.assert_array_equal(plain.eval_labels, stored)                   # default: clean evaluation labels
    np.testing.assert_array_equal(both.eval_labels[val], injected[val])        # validation: the injected labels
    np.testing.assert_array_equal(both.eval_labels[test], stored[test])        # test: always the stored ones
    assert (both.eval_labels[val] != stored[val]).any()
    batch = next(iter(data_lib.eval_batches(both, noisy_cfg, val, batch_size=len(val))))
    np.testing.assert_array_equal(np.asarray(batch["label"])[: len(val)], injected[val])


def test_noise_validation_needs_noise(tmp_path):
    cfg = C.apply_overrides(lesion.get_config(smoke=True), {"data.noise_validation": "true"})
    with pytest.raises(ConfigError, match="data.noise_validation"):
        runner.check(cfg, tmp_path, stages=["data"], settings=[])
