"""Several training seeds in one work directory, and the report's uncertainty: mean ± std, bootstrap intervals.

`--seeds=0,1,2` trains every requested setting once per seed. Layout:

    WORKDIR/                 the run of `--seed` (a single-seed run's layout, unchanged)
    WORKDIR/seeds/<s>/       the run of every other seed s: a full work directory of its own
                             (config.json with seed=s, data/, teachers/, settings/, eval/, report)

Each seed's run is pinned by its own config.json, so adding a seed to a finished run trains only
that seed; `--seed` must be among `--seeds` (validate.check_options). **Teachers are trained per
seed**: the seed draws the teachers' initialisation and augmentation, and also the injected label
noise (`--data.noise`), so the teachers' randomness, a part of the method's variance, is in the
spread, and a student never distils teachers trained on another seed's noisy labels. The price is
K teachers per seed. The split and the teacher subsets come from `--data.split_seed` and
`--teachers.subset_seed` and are the same for every seed: every seed is scored on the same test
examples. Attacks, landscapes, sweeps and folds run on `--seed`'s run only.

The report (runner.build_report) shows per setting the mean and the sample standard deviation
(ddof = 1) over the seeds of every test metric (`aggregate`), and for RoS-KD against each baseline
a paired bootstrap interval of the test macro-F1 and mean-AUROC difference (`compare`): every
replicate resamples the test examples with replacement, scores both models of every seed on that
same resample and averages the per-seed differences. The interval thus measures the test set's
sampling error of the seed-averaged difference; the seeds' spread is the ± of Table I.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from rosjax.config import ExperimentConfig
from rosjax.eval import metrics, stats
from rosjax.experiment import scoring

METRICS = ("f1_macro", "auroc_macro")  # the differences the report gives intervals for


def seed_list(cfg: ExperimentConfig) -> list[int]:
    """The training seeds of a run: `--seeds`, or `--seed` alone."""
    return list(cfg.seeds) or [cfg.seed]


def extra_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds with a nested run under WORKDIR/seeds/ (all but `--seed`)."""
    return [s for s in seed_list(cfg) if s != cfg.seed]


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The configuration of one seed's run: a single-seed run of that seed."""
    return dataclasses.replace(cfg, seed=seed, seeds=())


def seed_root(root: pathlib.Path, cfg: ExperimentConfig, seed: int) -> pathlib.Path:
    """The work directory of one seed's run: WORKDIR itself for `--seed`, else WORKDIR/seeds/<seed>."""
    return pathlib.Path(root) if seed == cfg.seed else pathlib.Path(root) / "seeds" / str(seed)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(records: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Table I's entries over seeds, from `records[seed][setting]` (runner's per-run entries).

    A setting scored in at least one seed gets 'test' (the mean of every numeric test metric),
    'test_std' (sample std, ddof = 1; None with one seed), 'seeds' (those scored), 'per_seed'
    ({seed: test metrics}), 'wall_clock_s' (mean), 'collapsed' (each seed's symptoms) and a
    'status' when some seeds are missing. Others keep the first seed's entry (their status).
    """
    seeds = list(records)
    out = {}
    for name, first in records[seeds[0]].items():
        entries = {s: records[s].get(name, {}) for s in seeds}
        scored = [s for s in seeds if "test" in entries[s]]
        if not scored:
            out[name] = first
            continue
        tests = [entries[s]["test"] for s in scored]
        keys = [k for k in tests[0] if all(t.get(k) is None or _is_number(t.get(k)) for t in tests)]
        spread = {k: stats.mean_std([t.get(k) for t in tests]) for k in keys}
        entry = {k: v for k, v in entries[scored[0]].items() if k not in ("test", "collapse_check", "collapsed")}
        entry.update(test={k: m for k, (m, _) in spread.items()}, test_std={k: sd for k, (_, sd) in spread.items()},
                     seeds=scored, per_seed={str(s): entries[s]["test"] for s in scored},
                     wall_clock_s=stats.mean_std([entries[s].get("wall_clock_s") for s in scored])[0])
        collapsed = {f"seed {s}: {k}": v for s in scored for k, v in (entries[s].get("collapsed") or {}).items()}
        if collapsed:
            entry["collapsed"] = collapsed
        if len(scored) < len(seeds):
            entry["status"] = f"{len(scored)} of {len(seeds)} seeds"
        out[name] = entry
    return out


def _load(root: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(truth, pred, score) [N, C] of a setting's stored test outputs (Table I's decisions), or None."""
    path = scoring.predictions_path(root, name)
    if not path.exists():
        return None
    with np.load(path) as stored:
        logits, label = stored["logits"], stored["label"]
    multilabel = label.ndim == 2
    score = metrics.scores_from_logits(logits, multilabel=multilabel)
    truth, pred = metrics.decisions(label, score, multilabel=multilabel)
    return truth, pred, score


def compare(roots: dict[int, pathlib.Path], method: str, baselines, *, n_resamples: int = stats.N_RESAMPLES,
            seed: int = 0, confidence: float = stats.CONFIDENCE) -> dict[str, Any] | None:
    """Paired bootstrap intervals of `method` − each baseline's test macro-F1 and mean AUROC.

    `roots` maps each training seed to its run's work directory. A baseline is compared over the
    seeds where both it and `method` have stored test outputs; None when no baseline has any.
    Returns {'method', 'n_resamples', 'bootstrap_seed', 'baselines': {name: {'seeds', 'f1_macro':
    interval, 'auroc_macro': interval}}} with `stats.percentile_interval`'s intervals, whose
    'estimate' is the mean over seeds of the full test set's difference.
    """
    outputs = {(name, s): out for s, root in roots.items() for name in (method, *baselines)
               if (out := _load(root, name)) is not None}
    pairs = {b: [s for s in roots if (method, s) in outputs and (b, s) in outputs] for b in baselines}
    pairs = {b: pooled for b, pooled in pairs.items() if pooled}
    if not pairs:
        return None
    used = sorted({(n, s) for b, pooled in pairs.items() for s in pooled for n in (method, b)})
    truth = outputs[used[0]][0]
    if any(not np.array_equal(outputs[key][0], truth) for key in used):
        raise ValueError("the seeds' runs were scored on different test labels; they cannot be paired "
                         "(every seed's run must share --data.split_seed and the dataset)")

    def scores(counts: np.ndarray) -> dict[tuple, dict[str, np.ndarray]]:
        return {key: {"f1_macro": stats.macro_f1(t, p, counts), "auroc_macro": stats.mean_auroc(t, s, counts)}
                for key, (t, p, s) in ((k, outputs[k]) for k in used)}

    point = scores(np.ones((1, truth.shape[0])))  # the whole test set once: Table I's values
    chunks = [scores(counts) for counts in stats.bootstrap_counts(truth.shape[0], n_resamples, seed)]
    replicates = {key: {m: np.concatenate([c[key][m] for c in chunks]) for m in METRICS} for key in used}
    result = {}
    for b, pooled in pairs.items():
        result[b] = {"seeds": pooled}
        for m in METRICS:
            diff = np.mean([replicates[(method, s)][m] - replicates[(b, s)][m] for s in pooled], axis=0)  # [R]
            estimate = float(np.mean([point[(method, s)][m][0] - point[(b, s)][m][0] for s in pooled]))
            result[b][m] = stats.percentile_interval(diff, estimate, confidence)
    return {"method": method, "n_resamples": n_resamples, "bootstrap_seed": seed, "confidence": confidence,
            "baselines": result}
