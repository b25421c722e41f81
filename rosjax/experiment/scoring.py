"""The evaluation stage: test metrics of every setting, attacks (Table II), landscapes (Figure 4).

Results go to `WORKDIR/eval/<name>.json` (one file per setting and analysis), each written
once and skipped on a rerun, each setting's test-split outputs to `WORKDIR/eval/<name>.test.npz`
(the report's bootstrap intervals), and the plots to `WORKDIR/plots/`.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import pathlib
from typing import Any

import jax
import numpy as np

from rosjax import atomic
from rosjax.config import ExperimentConfig
from rosjax.eval import attacks, collapse, landscape, metrics
from rosjax.experiment import artifacts
from rosjax.experiment import data as data_lib
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import Workdir, read_json, write_json
from rosjax.progress import bar
from rosjax.train import loop, validation
from rosjax.train.state import ModelState

log = logging.getLogger(__name__)

def settings_to_evaluate(settings) -> list[str]:
    """Settings to score after training `settings` (RoS-KD's run also brings baseline V)."""
    return settings_lib.evaluated(settings)


def cached(path, compute):
    """Reads `path` if it exists, else computes, writes and returns the JSON value."""
    if path.exists():
        return read_json(path)
    value = compute()
    write_json(path, value)
    return value


def evaluate_all(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, settings, mesh, *,
                 analyses: bool = True) -> dict:
    """Runs every evaluation whose output is missing; returns {'settings', 'robustness', 'landscape'}.

    `analyses=False` scores the settings only (sweep points skip attacks and landscapes).
    """
    results = {"settings": {}, "robustness": {}, "landscape": {}}
    missing = [n for n in settings_to_evaluate(settings) if not (wd.root / "eval" / f"{n}.json").exists()]
    if missing:
        log.info("evaluate: test metrics of %s", ", ".join(missing))
    for name in settings_to_evaluate(settings):
        results["settings"][name] = cached(wd.path("eval", f"{name}.json"),
                                           functools.partial(score_setting, cfg, wd, data, name, mesh))
        if not predictions_path(wd.root, name).exists():  # scored by a version that did not store them
            predict_split(cfg, wd, data, name, mesh)

    compared = [s for s in settings_lib.COMPARED if s in settings_to_evaluate(settings)]
    if analyses and compared:
        results["robustness"] = cached(wd.path("eval", "robustness.json"),
                                       lambda: robustness(cfg, wd, data, compared))
        results["landscape"] = cached(wd.path("eval", "landscape.json"),
                                      lambda: landscapes(cfg, wd, data, compared))
    return results


def score_setting(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, name: str,
                  mesh) -> dict[str, Any]:
    """Test metrics of one model, plus the collapse checks of `rosjax.eval.collapse`.

    Returns {'test': metrics (as `training.test_metrics`, multi-label at threshold 0.5),
    'collapse_check': prediction statistics}, for a multi-label task 'test_tuned' (the test
    metrics at per-class thresholds tuned on the validation split), and 'collapsed': {symptom:
    description} when the test predictions are constant or the training run's gradients died
    (logged as a WARNING naming the setting).
    """
    def split_scores(split):  # (the stored outputs, probabilities [N, C]) of one split
        out = predict_split(cfg, wd, data, name, mesh, split)
        return out, metrics.scores_from_logits(out["logits"], multilabel=data.multilabel)
    out, scores = split_scores("test")
    test = {**metrics.classification_metrics(out["label"], scores, multilabel=data.multilabel,
                                             class_names=data.dataset.class_names),
            "loss": float(np.mean(out["loss"]))}
    result = {"test": test, "collapse_check": collapse.prediction_stats(scores, multilabel=data.multilabel)}
    if data.multilabel:  # Table I shows 0.5 ('test'); the report adds F1 at thresholds tuned on validation
        val_out, val_scores = split_scores("validation")
        result["test_tuned"] = metrics.tuned_metrics(val_out["label"], val_scores, out["label"], scores,
                                                     class_names=data.dataset.class_names)
    trained = settings_lib.get(name).folder  # baseline V's run is RoS-KD's
    symptoms = {**collapse.prediction_symptoms(scores, multilabel=data.multilabel),
                **collapse.gradient_symptoms(
                    collapse.grad_norms_from_file(wd.setting_dir(trained) / loop.METRICS_FILE))}
    if symptoms:
        log.warning("COLLAPSE: setting %s (test split): %s", name, collapse.describe(symptoms))
        result["collapsed"] = symptoms
    return result


def predictions_path(root: pathlib.Path, name: str, split: str = "test") -> pathlib.Path:
    """Where a setting's outputs on one split are stored: `eval/<name>.<split>.npz`."""
    return pathlib.Path(root) / "eval" / f"{name}.{split}.npz"


def predict_split(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, name: str,
                  mesh, split: str = "test") -> dict[str, np.ndarray]:
    """The setting's outputs on `split` {'logits' [N, C], 'label' [N] or [N, C], 'loss' [N]}, in
    split order; inferred once and stored in `eval/<name>.<split>.npz`: the report's paired
    bootstrap (rosjax.experiment.seeds) reads the test outputs without re-inference."""
    path = predictions_path(wd.root, name, split)
    if path.exists():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    model, variables, _ = artifacts.load_setting(wd.root, name)
    predict = validation.make_predict(mesh, multilabel=data.multilabel)
    out = predict(ModelState.of(model, variables), data_lib.eval_batches(data, cfg, data.splits[split]))
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buffer.getvalue())
    return out


def _attack_rows(cfg: ExperimentConfig, data: data_lib.ExperimentData) -> np.ndarray:
    """The attacked test rows: the first `attack_examples` of the test split (0: all)."""
    rows = data.splits["test"]
    return rows[:cfg.evaluation.attack_examples] if cfg.evaluation.attack_examples else rows


def robustness(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, names) -> dict[str, Any]:
    """Table II: macro precision / recall / F1 before and after FGSM and PGD, per setting."""
    e = cfg.evaluation
    log.info("evaluate: FGSM and PGD (l%s, eps %.3f) against %s", e.attack_norm, e.attack_eps, ", ".join(names))
    out: dict[str, Any] = {}
    for method in ("fgsm", "pgd"):
        attack = attacks.AttackConfig(method=method, norm=e.attack_norm, eps=e.attack_eps, steps=e.pgd_steps)
        label = f"{method.upper()} (l{e.attack_norm}, eps={e.attack_eps:.3f})"
        out[label] = {}
        for name in names:
            model, variables, _ = artifacts.load_setting(wd.root, name)
            apply_fn = functools.partial(model.apply, train=False)
            rows = _attack_rows(cfg, data)
            with bar(math.ceil(len(rows) / cfg.data.eval_batch_size), f"{method.upper()} on {name}") as progress:
                pixels = data_lib.eval_batches(data, cfg, rows, rendered=True)  # [0, 1] images to attack
                batches = (progress.update(1) or batch for batch in pixels)
                y, clean, adv = attacks.evaluate_under_attack(apply_fn, variables, batches, attack,
                                                              jax.random.key(cfg.seed), multilabel=data.multilabel)
            score = functools.partial(metrics.classification_metrics, multilabel=data.multilabel,
                                      class_names=data.dataset.class_names)
            out[label][name] = {"before": _headline(score(y, clean)), "after": _headline(score(y, adv)),
                                "examples": int(len(y))}
    return out


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("precision_macro", "recall_macro", "f1_macro", "accuracy", "auroc_macro")
    return {k: m[k] for k in keys}


def landscapes(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, names) -> dict[str, Any]:
    """Figure 4: loss surfaces around each compared setting, same direction seed and test images."""
    e = cfg.evaluation
    log.info("evaluate: loss landscapes (%d x %d grid) of %s", e.landscape_grid, e.landscape_grid, ", ".join(names))
    rows = data.splits["test"][:e.landscape_examples]
    batches = data_lib.eval_batches(data, cfg, rows, batch_size=len(rows), rendered=True)
    batch = next(iter(batches))
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    coords = np.linspace(-1.0, 1.0, e.landscape_grid)
    models = {}
    for name in names:
        model, variables, _ = artifacts.load_setting(wd.root, name)
        loss_fn = landscape.dataset_loss_fn(functools.partial(model.apply, train=False), multilabel=data.multilabel)
        models[name] = (loss_fn, variables["params"], (variables["batch_stats"], images, labels))
    prefix = wd.folder("plots") / "landscape"
    surfaces = landscape.compare_landscapes(models, jax.random.key(e.landscape_seed), prefix, coords=coords)
    radius = 0.5 if e.landscape_grid > 5 else 1.0
    return {name: {"loss_at_origin": float(s[len(coords) // 2, len(coords) // 2]),
                   "flatness": landscape.flatness(s, coords, radius), "flatness_radius": radius,
                   "contour_png": f"plots/landscape_{name}_contour.png",
                   "surface_png": f"plots/landscape_{name}_surface.png"}
            for name, s in surfaces.items()}

