"""The noisy-label study's results: collected from its per-rate work directories, written as a table and a plot.

experiments.noise_study runs one experiment work directory per injected noise rate; `collect`
reads each one's report (runner.build_report: Table I's mean ± std over the seeds, each seed's
numbers, the RoS-KD − baseline paired bootstrap intervals) and keeps the macro-F1; `write` renders
WORKDIR/noise_study.md, noise_study.json and noise_study.png (macro-F1 against the rate per
setting, the seeds' standard deviation as error bars).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rosjax import atomic
from rosjax.config import ExperimentConfig
from rosjax.eval import report as report_lib
from rosjax.experiment import runner
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import Workdir

METRIC = "f1_macro"


def rate_folder(rate: float) -> str:
    """The work directory of one noise rate under the study's: noise_0, noise_0.2, ..."""
    return f"noise_{rate:g}"


def _f1(entry: dict[str, Any]) -> dict[str, Any]:
    """One setting at one rate: macro-F1 mean, std over seeds (None: one seed), each seed's, collapse."""
    if "test" not in entry:
        return {"status": entry.get("status", "not run")}
    per_seed = {s: t[METRIC] for s, t in entry["per_seed"].items()} if "per_seed" in entry else None
    return {"mean": entry["test"][METRIC], "std": entry.get("test_std", {}).get(METRIC),
            "per_seed": per_seed, **({"collapsed": entry["collapsed"]} if entry.get("collapsed") else {})}


def collect(cfg: ExperimentConfig, root: pathlib.Path, per_rate: dict[float, ExperimentConfig],
            settings, data_about: dict[str, Any]) -> dict[str, Any]:
    """The study's numbers from every rate's work directory (`per_rate`: rate -> its configuration)."""
    shown = settings_lib.evaluated(list(settings))
    out: dict[str, Any] = {
        "rates": list(per_rate), "seeds": list(cfg.seeds) or [cfg.seed], "smoke": cfg.smoke,
        "data": {**data_about, "dataset": cfg.data.dataset},
        "noise": {"mode": next(iter(per_rate.values())).data.noise, "validation": cfg.data.noise_validation,
                  "measured": {}},
        "models": {"teachers": list(cfg.teachers.architectures), "student": cfg.distill.student,
                   "epochs": cfg.optim.epochs, "image_size": cfg.data.image_size},
        "settings": {name: {"title": settings_lib.get(name).title, "rates": {}} for name in shown},
        "comparisons": {}, "workdirs": {},
    }
    for rate, rcfg in per_rate.items():
        key = f"{rate:g}"
        folder = root / rate_folder(rate)
        out["workdirs"][key] = rate_folder(rate)
        report = runner.build_report(rcfg, Workdir(folder))
        if report.get("data", {}).get("noise"):
            out["noise"]["measured"][key] = report["data"]["noise"]["measured"]
        if report.get("data") and "split_sizes" in report["data"]:
            out["data"]["split_sizes"] = report["data"]["split_sizes"]
        for name in shown:
            out["settings"][name]["rates"][key] = _f1(report["settings"].get(name, {}))
        if report.get("comparisons"):
            out["comparisons"][key] = {b: c[METRIC] for b, c in report["comparisons"]["baselines"].items()
                                       if b in shown}
    return out


def _interval(c: dict[str, Any] | None) -> str:
    if c is None:
        return "—"
    if c.get("low") is None:
        return f"{c['estimate']:+.3f}"
    return f"{c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" + (" *" if c["excludes_zero"] else "")


def _cell(r: dict[str, Any]) -> str:
    if "mean" not in r:
        return r["status"]
    return report_lib._mean_std(r["mean"], r["std"]) + (" ⚠" if r.get("collapsed") else "")


def render_markdown(results: dict[str, Any]) -> str:
    """noise_study.md: what was run, the setting x rate table, the RoS-KD − baseline intervals."""
    rates = [f"{r:g}" for r in results["rates"]]
    d, n, m = results["data"], results["noise"], results["models"]
    lines = ["# Noisy-label study: test macro-F1 against injected label noise", ""]
    if results["smoke"]:
        lines += [f"**Smoke run** ({', '.join(m['teachers'])} teachers, {m['student']} student, {m['epochs']} epochs, "
                  f"{m['image_size']}-px crops): it checks the study's plumbing; its numbers are not the paper's.", ""]
    if d["source"] == "generated":
        images = 8 * d["per_class"]
        what = (f"generated {d['dataset']}-layout images (rosjax.data.make_samples: {images:,} images, "
                f"{d['per_class']} per class, difficulty {d['difficulty']:g}) in {d['manual_dir']}")
    else:
        what = f"the {d['dataset']} files in {d['manual_dir']}"
    sizes = d.get("split_sizes")
    lines += [f"- **Data**: {what}" + (f"; split train {sizes['train']}, validation {sizes['validation']}, "
                                         f"test {sizes['test']} images" if sizes else "") + ".",
              f"- **Noise**: {n['mode']}, injected into the training labels"
              + (" **and the validation labels** (`--data.noise_validation=true`: model selection and tuned "
                 "thresholds see noisy labels, as a user's would)" if n["validation"] else
                 "; validation labels clean (`--data.noise_validation=false`)")
              + ". Test labels are always the stored (clean) ones.",
              f"- **Models**: teachers {', '.join(m['teachers'])}; student {m['student']}; {m['epochs']} epochs, "
              f"{m['image_size']}-px crops.",
              f"- **Seeds**: {', '.join(map(str, results['seeds']))} (each trains its own teachers and draws its own "
              "noise); one work directory per rate: " + ", ".join(f"`{w}/`" for w in results["workdirs"].values()),
              ""]
    if n["measured"]:
        lines += ["Measured fraction of changed labels (seed "
                  f"{results['seeds'][0]}):", "",
                  *report_lib._table(["Split", *rates], [[split, *[n["measured"].get(r, {}).get(split) for r in rates]]
                                                        for split in ("train", "validation", "test")]), ""]
    several = len(results["seeds"]) > 1
    lines += ["## Test macro-F1" + (" (mean ± sample std over seeds)" if several else ""), "",
              *report_lib._table(["Setting", *[f"noise {r}" for r in rates]],
                                 [[s["title"], *[_cell(s["rates"].get(r, {"status": "not run"})) for r in rates]]
                                  for s in results["settings"].values()]), ""]
    collapsed = [f"- ⚠ **{s['title']}**, noise {r}: " + "; ".join(f"{k}: {v}" for k, v in cell["collapsed"].items())
                 for s in results["settings"].values() for r, cell in s["rates"].items() if cell.get("collapsed")]
    if collapsed:
        lines += ["**Collapsed runs** (constant predictions or dead gradients: failed runs, not the method's "
                  "numbers):", "", *collapsed, ""]
    baselines = list(dict.fromkeys(b for c in results["comparisons"].values() for b in c))
    if baselines:
        method = settings_lib.get(settings_lib.METHOD).title
        lines += [f"## {method} minus each baseline (test macro-F1, paired bootstrap 95 % interval)", "",
                  "Averaged over the seeds; the interval resamples the test examples (a * marks one that excludes 0) "
                  "and does not cover the spread over training seeds.", "",
                  *report_lib._table(["Baseline", *[f"noise {r}" for r in rates]],
                                     [[settings_lib.get(b).title,
                                       *[_interval(results["comparisons"].get(r, {}).get(b)) for r in rates]]
                                      for b in baselines]), ""]
    lines += ["![macro-F1 against the noise rate](noise_study.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Test macro-F1 against the noise rate, one line per setting, the seeds' std as error bars."""
    rates = results["rates"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    step = 0.004 * (max(rates) - min(rates) or 1.0)  # a small shift per setting keeps the bars apart
    names = list(results["settings"])
    for i, name in enumerate(names):
        cells = [results["settings"][name]["rates"].get(f"{r:g}", {}) for r in rates]
        mean = np.array([c.get("mean", np.nan) for c in cells], float)
        std = np.array([c.get("std") if c.get("std") is not None else 0.0 for c in cells], float)
        if np.isnan(mean).all():
            continue
        ax.errorbar(np.array(rates) + (i - (len(names) - 1) / 2) * step, mean, yerr=std, marker="o", capsize=3,
                    label=results["settings"][name]["title"])
    seeds = len(results["seeds"])
    ax.set(xlabel=f"injected training-label noise rate ({results['noise']['mode']})", ylabel="test macro-F1",
           xticks=rates, title="Macro-F1 against label noise" + (" (smoke run)" if results["smoke"] else "")
           + (f": mean ± std over {seeds} seeds" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write(root: pathlib.Path, results: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Writes noise_study.json, .md and .png into `root`; returns their paths."""
    root = pathlib.Path(root)
    paths = root / "noise_study.json", root / "noise_study.md", root / "noise_study.png"
    atomic.write_text(paths[0], json.dumps(results, indent=1) + "\n")
    atomic.write_text(paths[1], render_markdown(results))
    plot(results, paths[2])
    return paths
