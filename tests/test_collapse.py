"""Collapse detection on hand-made predictions and gradient histories (rosjax.eval.collapse)."""
import numpy as np
import pytest

from rosjax.eval import collapse, report


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def healthy_one_label(n=200, c=8, seed=0):
    """Confident, input-dependent predictions spread over all classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return softmax(3.0 * np.eye(c)[y] + rng.normal(size=(n, c)))


def test_constant_one_label_predictor_is_flagged():
    # The collapsed run: the same distribution (here uniform-ish with class 1 on top) for every image.
    row = softmax(np.array([[0.0, 0.01, 0, 0, 0, 0, 0, 0]]))
    scores = np.repeat(row, 300, axis=0)
    symptoms = collapse.prediction_symptoms(scores, multilabel=False)
    assert set(symptoms) == {"constant_class", "constant_probabilities"}
    assert "100.0% of 300 predictions are class 1" in symptoms["constant_class"]
    stats = collapse.prediction_stats(scores, multilabel=False)
    assert stats["majority_class"] == 1 and stats["majority_share"] == 1.0
    assert stats["max_probability_std"] < 1e-12


def test_healthy_one_label_predictor_is_not_flagged():
    scores = healthy_one_label()
    assert collapse.prediction_symptoms(scores, multilabel=False) == {}
    stats = collapse.prediction_stats(scores, multilabel=False)
    assert stats["majority_share"] < 0.3 and stats["max_probability_std"] > 0.1


def test_one_class_for_99_percent_with_varying_probabilities_is_flagged():
    # Probabilities move with the input, but the argmax is class 0 for 198 of 200 examples.
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=0.3, size=(200, 4))
    logits[:, 0] += 2.0
    logits[:2, 0] -= 10.0  # two examples go elsewhere
    symptoms = collapse.prediction_symptoms(softmax(logits), multilabel=False)
    assert set(symptoms) == {"constant_class"}
    # 98 % is a (very) imbalanced but not constant predictor.
    logits[:4, 0] -= 10.0
    assert collapse.prediction_symptoms(softmax(logits), multilabel=False) == {}


def test_multilabel_constant_and_healthy():
    rng = np.random.default_rng(2)
    constant = np.tile(np.array([0.1, 0.02, 0.3, 0.05]), (100, 1)) + rng.normal(scale=1e-5, size=(100, 4))
    assert set(collapse.prediction_symptoms(constant, multilabel=True)) == {"constant_probabilities"}
    # Rare findings: thresholded predictions are all-negative, but probabilities vary -> healthy.
    rare = 1 / (1 + np.exp(-(rng.normal(size=(100, 4)) - 3.0)))
    assert (rare < 0.5).mean() > 0.9
    assert collapse.prediction_symptoms(rare, multilabel=True) == {}
    # One label varying is enough to be input-dependent.
    one_varies = constant.copy()
    one_varies[:, 2] = rare[:, 0]
    assert collapse.prediction_symptoms(one_varies, multilabel=True) == {}


def test_dead_gradient_histories():
    # The measured collapse: 21.5 in epoch 1, 0.09 at the end (ratio 4e-3).
    dead = [21.5, 3.0, 0.8, 0.3, 0.15, 0.1, 0.09, 0.09]
    symptoms = collapse.gradient_symptoms(dead)
    assert set(symptoms) == {"dead_gradients"} and "peak 21.5" in symptoms["dead_gradients"]
    # Healthy students: the norm falls with the learning-rate decay but stays within 10x of the peak.
    assert collapse.gradient_symptoms([2.4, 1.9, 1.7, 1.5, 1.2, 0.9, 0.8]) == {}
    # The peak is the reference, not the first epoch: a quiet first epoch does not hide a collapse.
    assert set(collapse.gradient_symptoms([0.5, 30.0, 2.0, 0.1])) == {"dead_gradients"}
    # Too short to judge; non-finite and missing entries are ignored.
    assert collapse.gradient_symptoms([5.0]) == {}
    assert collapse.gradient_symptoms([]) == {}
    assert collapse.gradient_symptoms([float("nan"), None, 1.0, 0.5]) == {}
    # The threshold is a parameter.
    assert collapse.gradient_symptoms([1.0, 0.05], ratio=0.1) != {}


def test_grad_norm_history_reads_metrics_records():
    records = [{"epoch": 1, "train": {"grad_norm": 3.0}}, {"epoch": 2, "train": {}},
               {"epoch": 3, "train": {"grad_norm": 0.5, "loss": 1.0}}]
    assert collapse.grad_norm_history(records) == [3.0, 0.5]


def test_bad_scores_raise():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        collapse.prediction_stats(np.zeros(5), multilabel=False)


def test_report_marks_collapsed_rows():
    healthy = {"title": "Baseline III (equal-weight teachers)", "test": {"f1_macro": 0.4}}
    broken = {"title": "RoS-KD (M_smooth)", "test": {"f1_macro": 0.028},
              "collapsed": {"constant_class": "100.0% of 300 predictions are class 1"}}
    md = report.render_markdown({"experiment": "x", "settings": {"baseline_iii": healthy, "ros_kd": broken}})
    table = md.split("## Table I")[1].split("##")[0]
    rosjax_row = next(line for line in table.splitlines() if line.startswith("| RoS-KD"))
    baseline_row = next(line for line in table.splitlines() if line.startswith("| Baseline III"))
    assert "COLLAPSED" in rosjax_row and "COLLAPSED" not in baseline_row
    assert "**RoS-KD (M_smooth)**: constant_class: 100.0% of 300 predictions are class 1" in table
    assert "Collapsed runs" not in report.render_markdown({"settings": {"baseline_iii": healthy}})
