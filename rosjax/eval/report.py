"""The experiment report: `report.json` (every number) and `report.md` (the paper's tables).

`render_markdown(report)` is a pure function of the JSON dict, so a report can be re-rendered
from `report.json` alone. The layout follows the paper: Table I (macro precision / recall /
F1 per setting), Table II (before / after attack), Table III (per-class AUROC, mean ± std
over independent runs), Figures 2–4 as sweep tables and linked PNGs.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Any

from rosjax import atomic


def write_report(workdir: str | os.PathLike, report: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `report.json` and `report.md` into `workdir` (atomically) and returns their paths."""
    workdir = pathlib.Path(workdir)
    json_path, md_path = workdir / "report.json", workdir / "report.md"
    atomic.write_json(json_path, report, default=_json_default)
    atomic.write_text(md_path, render_markdown(report))
    return json_path, md_path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"report value of type {type(value).__name__} is not JSON-serialisable")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report; every section is optional and appears when its data exists."""
    lines = [f"# rosjax report: {report.get('experiment', '?')}", ""]
    if report.get("smoke"):
        lines += ["*Smoke run on the bundled sample files: numbers check the pipeline, not the method.*", ""]
    lines += _data_section(report.get("data", {}))
    lines += _teachers_section(report.get("teachers", []), report.get("main_seed") if report.get("seeds") else None)
    settings = report.get("settings", {})
    titles = {name: entry.get("title", name) for name, entry in settings.items()}
    lines += _table_i(settings, report.get("table_i_order", list(settings)), report.get("seeds"),
                      report.get("main_seed"))
    lines += _comparison_section(report.get("comparisons"), titles)
    lines += _tuned_section(settings, report.get("table_i_order", list(settings)))
    lines += _robustness_section(report.get("robustness", {}), titles)
    lines += _landscape_section(report.get("landscape", {}), titles)
    for sweep_name, sweep in report.get("sweeps", {}).items():
        lines += _sweep_section(sweep_name, sweep)
    lines += _folds_section(report.get("folds", {}))
    lines += _cost_section(settings, titles, report.get("cost_reference"))
    return "\n".join(lines) + "\n"


def _data_section(data: dict[str, Any]) -> list[str]:
    if not data:
        return []
    lines = ["## Data", ""]
    sizes = data.get("split_sizes", {})
    if sizes:
        lines += ["Split sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "."]
    overlap = data.get("group_overlap", {})
    if overlap:
        lines += ["Groups (patients / lesions) shared between splits: "
                  + ", ".join(f"{k} {v}" for k, v in overlap.items()) + "."]
    subsets = data.get("teacher_subsets", [])
    if subsets:
        lines += ["", *_table(["teacher", "architecture", "examples", "injected label noise"],
                              [[s["index"], s["architecture"], s["size"], s.get("noise_rate")]
                               for s in subsets])]
    return lines + [""]


def _teachers_section(teachers: list[dict[str, Any]], seed: int | None = None) -> list[str]:
    """The teachers of the run in WORKDIR; `seed` (several seeds) names it."""
    if not teachers:
        return []
    rows = [[t["index"], t["architecture"], t["test"].get("precision_macro"), t["test"].get("recall_macro"),
             t["test"].get("f1_macro"), t["test"].get("auroc_macro")] for t in teachers]
    note = [] if seed is None else [f"The teachers of seed {seed}; every seed's are in report.json (seed_runs).", ""]
    return ["## Teachers (test split)", "", *note,
            *_table(["#", "architecture", "Precision", "Recall", "F1", "mean AUROC"], rows), ""]


TABLE_I_METRICS = ("precision_macro", "recall_macro", "f1_macro", "accuracy", "balanced_accuracy", "auroc_macro",
                   "ece")


def _mean_std(mean: Any, std: Any) -> str:
    """`mean ± std` (std None: one seed, the mean alone)."""
    return _fmt(mean) if std is None or mean is None else f"{_fmt(mean)} ± {_fmt(std)}"


def _table_i(settings: dict[str, Any], order: list[str], seeds: list[int] | None = None,
             main_seed: int | None = None) -> list[str]:
    """Table I; with several seeds, every cell is mean ± sample std over the seeds, with their count."""
    if not settings:
        return []
    several = bool(seeds) and len(seeds) > 1
    rows, collapsed = [], []
    for key in order:
        entry = settings.get(key)
        title = (entry or {}).get("title", key)
        if (entry or {}).get("collapsed"):  # rosjax.eval.collapse symptoms
            collapsed.append(f"- ⚠ **{title}**: " + "; ".join(f"{k}: {v}" for k, v in entry["collapsed"].items()))
            title = f"{title} ⚠ COLLAPSED"
        if entry is None or "test" not in entry:
            status = (entry or {}).get("status", "not run")
            rows.append([title, status, *[""] * (len(TABLE_I_METRICS) - 1 + several)])
            continue
        m, sd = entry["test"], entry.get("test_std", {})
        cells = [_mean_std(m.get(k), sd.get(k)) if several else m.get(k) for k in TABLE_I_METRICS]
        if several:
            shown = len(entry.get("seeds", []))
            cells.append(f"{shown} of {len(seeds)}" if shown < len(seeds) else shown)
        rows.append([title, *cells])
    header = ["Setting", "Precision", "Recall", "F1", "Accuracy", "Bal. acc.", "mean AUROC", "ECE",
              *(["Seeds"] if several else [])]
    lines = ["## Table I: test performance (macro averages)", ""]
    if several:
        lines += [f"Mean ± sample standard deviation (ddof = 1) over {len(seeds)} training seeds "
                  f"({', '.join(map(str, seeds))}). Each seed trains its own teachers and draws its own "
                  "injected label noise; every seed is tested on the same test split. Table II, Figure 4, "
                  f"the sweeps and folds use the run of seed {main_seed}.", ""]
    lines += [*_table(header, rows), ""]
    if collapsed:
        lines += ["**Collapsed runs** (constant predictions or dead gradients; their scores are not "
                  "the method's):", "", *collapsed, ""]
    return lines


def _comparison_section(comparisons: dict[str, Any] | None, titles: dict[str, str]) -> list[str]:
    """RoS-KD − each baseline on the test set: the difference and its paired bootstrap interval."""
    if not comparisons or not comparisons.get("baselines"):
        return []
    method = titles.get(comparisons["method"], comparisons["method"])
    confidence = f"{100 * comparisons['confidence']:g} %"

    def cells(interval: dict[str, Any]) -> list[str]:
        if interval.get("low") is None:
            return [f"{interval['estimate']:+.3f}", "—"]
        mark = " *" if interval["excludes_zero"] else ""
        return [f"{interval['estimate']:+.3f}", f"[{interval['low']:+.3f}, {interval['high']:+.3f}]{mark}"]

    rows = [[titles.get(name, name), ", ".join(map(str, c["seeds"])), *cells(c["f1_macro"]), *cells(c["auroc_macro"])]
            for name, c in comparisons["baselines"].items()]
    several = any(len(c["seeds"]) > 1 for c in comparisons["baselines"].values())
    header = ["Baseline", "seeds", "Δ F1", f"{confidence} interval", "Δ mean AUROC", f"{confidence} interval"]
    return [f"## Table I: {method} against each baseline (test set, paired bootstrap)", "",
            f"Δ = {method} minus the baseline (macro-F1, mean AUROC), averaged over the seeds. The interval: "
            f"percentiles of {comparisons['n_resamples']} resamples of the test examples, drawn with replacement "
            f"(seed {comparisons['bootstrap_seed']}), each scoring both models of every seed on the same examples. "
            "A * marks an interval that excludes 0: on this test set the difference is not sampling noise. "
            + ("It does not cover the spread over training seeds (Table I's ±)." if several else
             "One training seed: it does not cover training randomness (--seeds=0,1,2 adds that)."), "",
            *_table(header, rows), ""]


def _tuned_section(settings: dict[str, Any], order: list[str]) -> list[str]:
    """Multi-label only: F1 at 0.5 (Table I's) beside F1 at per-class thresholds tuned on validation."""
    rows = [[settings[k].get("title", k), settings[k]["test"].get("f1_macro"), t.get("precision_macro"),
             t.get("recall_macro"), t.get("f1_macro")]
            for k in order if (t := (settings.get(k) or {}).get("test_tuned"))]
    if not rows:
        return []
    return ["## Multi-label decision thresholds", "",
            "Table I predicts a label when its probability is at least 0.5. Below, the same test split with "
            "one threshold per class, chosen to maximise that class's F1 on the validation split.", "",
            *_table(["Setting", "F1 (0.5)", "Precision (tuned)", "Recall (tuned)", "F1 (tuned)"], rows), ""]


def _robustness_section(robustness: dict[str, Any], titles: dict[str, str]) -> list[str]:
    if not robustness:
        return []
    header = ["Attack", "Setting", "Precision", "Recall", "F1", "Precision (adv)", "Recall (adv)", "F1 (adv)"]
    rows = []
    for attack, per_setting in robustness.items():
        for setting, r in per_setting.items():
            b, a = r["before"], r["after"]
            rows.append([attack, titles.get(setting, setting), b.get("precision_macro"),
                         b.get("recall_macro"), b.get("f1_macro"), a.get("precision_macro"),
                         a.get("recall_macro"), a.get("f1_macro")])
    return ["## Table II: robustness (before / after attack)", "", *_table(header, rows), ""]


def _landscape_section(landscape: dict[str, Any], titles: dict[str, str]) -> list[str]:
    if not landscape:
        return []
    rows = [[titles.get(k, k), v.get("loss_at_origin"), v.get("flatness"),
             f"![{k}]({v['contour_png']})" if v.get("contour_png") else ""] for k, v in landscape.items()]
    return ["## Figure 4: loss landscapes", "",
            "Flatness = mean loss rise within the given radius of the trained weights (lower is flatter).", "",
            *_table(["Setting", "loss at origin", "flatness", "contour"], rows), ""]


def _sweep_section(name: str, sweep: dict[str, Any]) -> list[str]:
    shown = sweep.get("settings", [])
    titles = sweep.get("titles", {})
    rows = [[point, *(r.get(s) for s in shown)] for point, r in sweep.get("points", {}).items()]
    lines = [f"## Sweep: {sweep.get('title', name)}", "",
             *_table([sweep.get("parameter", "value"), *(f"{titles.get(s, s)} F1" for s in shown)], rows)]
    if sweep.get("plot_png"):
        lines += ["", f"![{name}]({sweep['plot_png']})"]
    return lines + [""]


def _folds_section(folds: dict[str, Any]) -> list[str]:
    if not folds:
        return []
    names = folds["class_names"]
    mean, std = folds["auroc_mean"], folds["auroc_std"]
    row = [f"{_fmt(m, 2)} ± {_fmt(s, 2)}" for m, s in zip(mean, std)]
    row.append(f"{_fmt(folds['mean_auroc_mean'], 3)} ± {_fmt(folds['mean_auroc_std'], 3)}")
    student = f", student {folds['student']}" if folds.get("student") else ""
    seeds = ", ".join(map(str, folds.get("split_seeds", [])))
    return [f"## Table III: per-class AUROC of {folds.get('setting', 'RoS-KD')}{student}, mean ± std over "
            f"{folds['runs']} patient-grouped re-splits", "",
            f"Split seeds {seeds or '?'}: each regroups the patients into train / validation / test and "
            "retrains the teachers and the student; the test splits of different re-splits may share patients "
            "(not k-fold cross-validation).", "",
            *_table(["Method", *names, "Mean"], [[folds.get("title", "RoS-KD (ours)"), *row]]), ""]


def _cost_section(settings: dict[str, Any], titles: dict[str, str], reference_name: str | None) -> list[str]:
    """Training wall-clock per training run, and its ratio to the method's (baseline IV's cost claim)."""
    reference = (settings.get(reference_name) or {}).get("wall_clock_s")
    rows = [[titles.get(k, k), v.get("wall_clock_s"),
             v["wall_clock_s"] / reference if reference else None, v.get("teacher_outputs", "")]
            for k, v in settings.items() if v.get("wall_clock_s") is not None and not v.get("trained_by")]
    if not rows:
        return []
    return ["## Cost", "",
            "Training wall-clock summed over epochs (compile and per-epoch validation included).", "",
            *_table(["Setting", "training wall-clock (s)", "× RoS-KD", "teacher outputs"], rows), ""]
