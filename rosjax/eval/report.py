"""The experiment report: `report.json` (every number) and `report.md` (the paper's tables).

`render_markdown(report)` is a pure function of the JSON dict, so a report can be re-rendered
from `report.json` alone. The layout follows the paper: Table I (macro precision / recall /
F1 per setting), Table II (before / after attack), Table III (per-class AUROC, mean ± std
over independent runs), Figures 2–4 as sweep tables and linked PNGs.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

SETTING_TITLES = {
    "baseline_i": "Baseline I (CE only)",
    "baseline_ii": "Baseline II (Hinton KD, one teacher)",
    "baseline_iii": "Baseline III (equal-weight teachers)",
    "baseline_iv": "Baseline IV (RL teacher selection)",
    "baseline_v": "Baseline V (RoS-KD, no smoothing)",
    "rosjax": "RoS-KD (M_smooth)",
}
TABLE_I_ORDER = tuple(SETTING_TITLES)


def write_report(workdir: str | os.PathLike, report: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `report.json` and `report.md` into `workdir` (atomically) and returns their paths."""
    workdir = pathlib.Path(workdir)
    json_path, md_path = workdir / "report.json", workdir / "report.md"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=True, default=_json_default))
    _atomic_write(md_path, render_markdown(report))
    return json_path, md_path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"report value of type {type(value).__name__} is not JSON-serialisable")


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    lines += _teachers_section(report.get("teachers", []))
    lines += _table_i(report.get("settings", {}))
    lines += _robustness_section(report.get("robustness", {}))
    lines += _landscape_section(report.get("landscape", {}))
    for sweep_name, sweep in report.get("sweeps", {}).items():
        lines += _sweep_section(sweep_name, sweep)
    lines += _folds_section(report.get("folds", {}))
    lines += _cost_section(report.get("settings", {}))
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


def _teachers_section(teachers: list[dict[str, Any]]) -> list[str]:
    if not teachers:
        return []
    rows = [[t["index"], t["architecture"], t["test"].get("precision_macro"), t["test"].get("recall_macro"),
             t["test"].get("f1_macro"), t["test"].get("auroc_macro")] for t in teachers]
    return ["## Teachers (test split)", "",
            *_table(["#", "architecture", "Precision", "Recall", "F1", "mean AUROC"], rows), ""]


def _table_i(settings: dict[str, Any]) -> list[str]:
    if not settings:
        return []
    rows = []
    for key in TABLE_I_ORDER:
        entry = settings.get(key)
        if entry is None or "test" not in entry:
            status = (entry or {}).get("status", "not run")
            rows.append([SETTING_TITLES[key], status, "", "", "", "", "", ""])
            continue
        m = entry["test"]
        rows.append([SETTING_TITLES[key], m.get("precision_macro"), m.get("recall_macro"), m.get("f1_macro"),
                     m.get("accuracy"), m.get("balanced_accuracy"), m.get("auroc_macro"), m.get("ece")])
    header = ["Setting", "Precision", "Recall", "F1", "Accuracy", "Bal. acc.", "mean AUROC", "ECE"]
    return ["## Table I: test performance (macro averages)", "", *_table(header, rows), ""]


def _robustness_section(robustness: dict[str, Any]) -> list[str]:
    if not robustness:
        return []
    header = ["Attack", "Setting", "Precision", "Recall", "F1", "Precision (adv)", "Recall (adv)", "F1 (adv)"]
    rows = []
    for attack, per_setting in robustness.items():
        for setting, r in per_setting.items():
            b, a = r["before"], r["after"]
            rows.append([attack, SETTING_TITLES.get(setting, setting), b.get("precision_macro"),
                         b.get("recall_macro"), b.get("f1_macro"), a.get("precision_macro"),
                         a.get("recall_macro"), a.get("f1_macro")])
    return ["## Table II: robustness (before / after attack)", "", *_table(header, rows), ""]


def _landscape_section(landscape: dict[str, Any]) -> list[str]:
    if not landscape:
        return []
    rows = [[SETTING_TITLES.get(k, k), v.get("loss_at_origin"), v.get("flatness"),
             f"![{k}]({v['contour_png']})" if v.get("contour_png") else ""] for k, v in landscape.items()]
    return ["## Figure 4: loss landscapes", "",
            "Flatness = mean loss rise within the given radius of the trained weights (lower is flatter).", "",
            *_table(["Setting", "loss at origin", "flatness", "contour"], rows), ""]


def _sweep_section(name: str, sweep: dict[str, Any]) -> list[str]:
    rows = [[point, r.get("rosjax_f1"), r.get("baseline_iii_f1")] for point, r in sweep.get("points", {}).items()]
    lines = [f"## Sweep: {sweep.get('title', name)}", "",
             *_table([sweep.get("parameter", "value"), "RoS-KD F1", "Baseline III F1"], rows)]
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
    return [f"## Table III: per-class AUROC of {folds.get('setting', 'RoS-KD')} over {folds['runs']} runs", "",
            *_table(["Method", *names, "Mean"], [[folds.get("title", "RoS-KD (ours)"), *row]]), ""]


def _cost_section(settings: dict[str, Any]) -> list[str]:
    """Training wall-clock per setting, and its ratio to RoS-KD's (baseline IV's cost claim)."""
    reference = (settings.get("rosjax") or {}).get("wall_clock_s")
    rows = [[SETTING_TITLES.get(k, k), v.get("wall_clock_s"),
             v["wall_clock_s"] / reference if reference else None, v.get("teacher_outputs", "")]
            for k, v in settings.items() if v.get("wall_clock_s") is not None and k != "baseline_v"]
    if not rows:
        return []
    return ["## Cost", "",
            "Training wall-clock summed over epochs (compile and per-epoch validation included).", "",
            *_table(["Setting", "training wall-clock (s)", "× RoS-KD", "teacher outputs"], rows), ""]
