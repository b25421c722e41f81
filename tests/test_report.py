"""report.md is rendered from report.json alone: the paper's table shapes, values, missing rows."""
import json

from rosjax.eval import report as report_lib
from rosjax.experiment import settings as settings_lib


def _metrics(p, r, f1):
    return {"precision_macro": p, "recall_macro": r, "f1_macro": f1, "accuracy": 0.5,
            "balanced_accuracy": r, "auroc_macro": 0.75, "ece": 0.1}


def _rows(markdown, heading):
    """The table rows (cells) under `heading`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]  # without the header


PAPER_ORDER = ["Baseline I (CE only)", "Baseline II (Hinton KD, one teacher on the full training split)",
               "Baseline II, one subset teacher (Hinton KD)", "Baseline III (equal-weight teachers)",
               "Baseline III, traditional (equal-weight teachers on the full training split)",
               "Baseline IV (RL teacher selection)", "Baseline V (RoS-KD, no smoothing)", "RoS-KD (M_smooth)",
               "RoS-KD (M_smooth), unnormalised Exp(1) weights (the paper's formula)",
               "RoS-KD (M_smooth), Exp(1) weights rescaled to sum K",
               "RoS-KD (M_smooth), Exp(1) weights rescaled to sum 1 (Dirichlet)"]


def test_table_i_lists_every_setting_in_the_papers_order(tmp_path):
    """The report dict as runner.build_report writes it: every registry entry, in Table I order."""
    results = {"baseline_iii": {"test": _metrics(0.691, 0.704, 0.694), "wall_clock_s": 50.0},
               "ros_kd": {"test": _metrics(0.713, 0.726, 0.716), "wall_clock_s": 40.0},
               "baseline_v": {"test": _metrics(0.7, 0.7, 0.7), "wall_clock_s": 40.0, "trained_by": "ros_kd"}}
    settings = {s.name: {"title": s.title, **results.get(s.name, {"status": "not run"})}
                for s in settings_lib.SETTINGS}
    report = {"experiment": "lesion", "settings": dict(reversed(settings.items())),  # order comes from the list
              "table_i_order": list(settings), "cost_reference": "ros_kd"}
    json_path, md_path = report_lib.write_report(tmp_path, report)
    assert json.loads(json_path.read_text()) == report
    rows = _rows(md_path.read_text(), "## Table I")
    assert [r[0] for r in rows] == PAPER_ORDER
    by_name = {r[0]: r for r in rows}
    assert by_name["RoS-KD (M_smooth)"][1:4] == ["0.713", "0.726", "0.716"]
    assert by_name["Baseline IV (RL teacher selection)"][1] == "not run"
    assert by_name["Baseline I (CE only)"][1] == "not run"
    cost = {r[0]: r for r in _rows(md_path.read_text(), "## Cost")}
    assert cost["Baseline III (equal-weight teachers)"][2] == "1.250"  # 50 s / 40 s
    assert "Baseline V (RoS-KD, no smoothing)" not in cost  # RoS-KD's run: no cost of its own


def test_table_iii_shows_mean_and_std():
    folds = {"class_names": ["Atelectasis", "Mass"], "auroc_mean": [0.83, 0.85], "auroc_std": [0.004, 0.02],
             "mean_auroc_mean": 0.84, "mean_auroc_std": 0.01, "runs": 3}
    rows = _rows(report_lib.render_markdown({"folds": folds}), "## Table III")
    assert rows == [["RoS-KD (ours)", "0.83 ± 0.00", "0.85 ± 0.02", "0.840 ± 0.010"]]


def test_missing_values_render_as_dashes_not_nan():
    report = {"settings": {"ros_kd": {"title": "RoS-KD (M_smooth)",
                                      "test": {**_metrics(0.5, 0.5, 0.5), "auroc_macro": None}}}}
    rows = {r[0]: r for r in _rows(report_lib.render_markdown(report), "## Table I")}
    assert rows["RoS-KD (M_smooth)"][6] == "—"
    assert "nan" not in report_lib.render_markdown(report).lower()


def _interval(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high, "confidence": 0.95, "resamples": 2000,
            "excludes_zero": low > 0 or high < 0}


def test_several_seeds_show_mean_std_and_the_bootstrap_intervals():
    """report.json of a --seeds=0,1,2 run: Table I cells are `mean ± std`, the intervals a table of their own."""
    settings = {
        "baseline_iii": {"title": "Baseline III (equal-weight teachers)", "test": _metrics(0.69, 0.70, 0.694),
                         "test_std": {**{k: 0.01 for k in _metrics(0, 0, 0)}, "f1_macro": 0.0123},
                         "seeds": [0, 1, 2]},
        "ros_kd": {"title": "RoS-KD (M_smooth)", "test": _metrics(0.71, 0.72, 0.716),
                   "test_std": {k: 0.02 for k in _metrics(0, 0, 0)}, "seeds": [0, 2], "status": "2 of 3 seeds"},
        "baseline_i": {"title": "Baseline I (CE only)", "status": "not run"}}
    comparisons = {"method": "ros_kd", "n_resamples": 2000, "bootstrap_seed": 0, "confidence": 0.95,
                   "baselines": {"baseline_iii": {"seeds": [0, 2], "f1_macro": _interval(0.022, 0.004, 0.041),
                                                  "auroc_macro": _interval(-0.003, -0.02, 0.011)}}}
    report = {"settings": settings, "table_i_order": ["baseline_i", "baseline_iii", "ros_kd"], "seeds": [0, 1, 2],
              "main_seed": 0, "comparisons": comparisons}
    markdown = report_lib.render_markdown(report)
    rows = {r[0]: r for r in _rows(markdown, "## Table I: test")}
    assert rows["Baseline III (equal-weight teachers)"][3] == "0.694 ± 0.012"
    assert rows["Baseline III (equal-weight teachers)"][8] == "3"
    assert rows["RoS-KD (M_smooth)"][1] == "0.710 ± 0.020" and rows["RoS-KD (M_smooth)"][8] == "2 of 3"
    assert rows["Baseline I (CE only)"][1] == "not run" and len(rows["Baseline I (CE only)"]) == 9
    assert "ddof = 1" in markdown and "own teachers" in markdown
    (compared,) = _rows(markdown, "## Table I: RoS-KD (M_smooth) against each baseline")
    assert compared == ["Baseline III (equal-weight teachers)", "0, 2", "+0.022", "[+0.004, +0.041] *",
                        "-0.003", "[-0.020, +0.011]"]


def test_one_seed_keeps_the_plain_table_and_adds_the_intervals():
    report = {"settings": {"ros_kd": {"title": "RoS-KD (M_smooth)", "test": _metrics(0.71, 0.72, 0.716)}},
              "comparisons": {"method": "ros_kd", "n_resamples": 500, "bootstrap_seed": 3, "confidence": 0.95,
                              "baselines": {"baseline_i": {"seeds": [0], "f1_macro": _interval(0.1, -0.05, 0.2),
                                                           "auroc_macro": _interval(0.1, 0.05, 0.2)}}}}
    markdown = report_lib.render_markdown(report)
    (row,) = _rows(markdown, "## Table I: test")
    assert row == ["RoS-KD (M_smooth)", "0.710", "0.720", "0.716", "0.500", "0.720", "0.750", "0.100"]
    assert "±" not in markdown
    (compared,) = _rows(markdown, "## Table I: RoS-KD (M_smooth) against each baseline")
    assert compared[3] == "[-0.050, +0.200]" and compared[5] == "[+0.050, +0.200] *"



def test_multi_label_report_shows_f1_at_05_and_at_tuned_thresholds():
    """Table I keeps threshold 0.5; a second table puts the validation-tuned F1 beside it."""
    tuned = {**_metrics(0.41, 0.52, 0.44), "thresholds": [0.2, 0.3]}
    report = {"settings": {"baseline_i": {"title": "Baseline I (CE only)", "test": _metrics(0.3, 0.1, 0.12),
                                          "test_tuned": tuned},
                           "ros_kd": {"title": "RoS-KD (M_smooth)", "test": _metrics(0.5, 0.2, 0.21),
                                      "test_tuned": {**tuned, "f1_macro": 0.47}}},
              "table_i_order": ["baseline_i", "ros_kd"]}
    markdown = report_lib.render_markdown(report)
    assert {r[0]: r[3] for r in _rows(markdown, "## Table I")} == {"Baseline I (CE only)": "0.120",
                                                                   "RoS-KD (M_smooth)": "0.210"}
    assert _rows(markdown, "## Multi-label decision thresholds") == [
        ["Baseline I (CE only)", "0.120", "0.410", "0.520", "0.440"],
        ["RoS-KD (M_smooth)", "0.210", "0.410", "0.520", "0.470"]]
    assert "at least 0.5" in markdown
    one_label = {"settings": {"ros_kd": {"title": "RoS-KD", "test": _metrics(0.5, 0.5, 0.5)}}}
    assert "decision thresholds" not in report_lib.render_markdown(one_label)
