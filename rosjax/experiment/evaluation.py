"""The evaluation stage: test metrics of every setting, attacks (Table II), landscapes (Figure 4).

Results go to `WORKDIR/eval/<name>.json` (one file per setting and analysis), each written
once and skipped on a rerun, and the plots to `WORKDIR/plots/`.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import numpy as np

from rosjax.config import ExperimentConfig
from rosjax.eval import attacks, landscape, metrics
from rosjax.experiment import artifacts
from rosjax.experiment import data as data_lib
from rosjax.experiment.training import test_metrics
from rosjax.experiment.workdir import Workdir, read_json, write_json

log = logging.getLogger(__name__)

ROBUSTNESS_SETTINGS = ("baseline_iii", "rosjax")  # compared in Table II and Figure 4


def settings_to_evaluate(settings) -> list[str]:
    """Model names to score: each trained setting, plus baseline V whenever RoS-KD ran."""
    names = [s for s in settings if s != "rosjax"]
    if "rosjax" in settings:
        names += ["baseline_v", "rosjax"]
    return names


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
    for name in settings_to_evaluate(settings):
        def compute(name=name):
            model, variables, _ = artifacts.load_setting(wd.root, name)
            return {"test": test_metrics(cfg, data, model, variables, mesh)}
        results["settings"][name] = cached(wd.path("eval", f"{name}.json"), compute)

    compared = [s for s in ROBUSTNESS_SETTINGS if s in settings_to_evaluate(settings)]
    if analyses and compared:
        results["robustness"] = cached(wd.path("eval", "robustness.json"),
                                       lambda: robustness(cfg, wd, data, compared))
        results["landscape"] = cached(wd.path("eval", "landscape.json"),
                                      lambda: landscapes(cfg, wd, data, compared))
    return results


def _attack_batches(cfg: ExperimentConfig, data: data_lib.ExperimentData):
    rows = data.splits["test"]
    if cfg.evaluation.attack_examples:
        rows = rows[:cfg.evaluation.attack_examples]
    return data_lib.eval_batches(data, cfg, rows)


def robustness(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, names) -> dict[str, Any]:
    """Table II: macro precision / recall / F1 before and after FGSM and PGD, per setting."""
    e = cfg.evaluation
    out: dict[str, Any] = {}
    for method in ("fgsm", "pgd"):
        attack = attacks.AttackConfig(method=method, norm=e.attack_norm, eps=e.attack_eps, steps=e.pgd_steps)
        label = f"{method.upper()} (l{e.attack_norm}, eps={e.attack_eps:.3f})"
        out[label] = {}
        for name in names:
            model, variables, _ = artifacts.load_setting(wd.root, name)
            apply_fn = functools.partial(model.apply, train=False)
            y, clean, adv = attacks.evaluate_under_attack(apply_fn, variables, _attack_batches(cfg, data), attack,
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
    rows = data.splits["test"][:e.landscape_examples]
    batches = data_lib.eval_batches(data, cfg, rows, batch_size=len(rows))
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

