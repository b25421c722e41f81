"""Metrics against scikit-learn on random inputs, and ECE against hand-derived values."""
import json
import warnings

import numpy as np
import pytest
from scipy.special import expit
from scipy.special import softmax as sp_softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from rosjax.eval.metrics import (
    classification_metrics,
    scores_from_logits,
    sigmoid,
    softmax,
    tune_thresholds,
    tuned_metrics,
)


def one_label_data(rng, n=200, c=5, absent=()):
    classes = np.array([k for k in range(c) if k not in absent])
    y = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]  # informative but noisy
    return y, softmax(logits)


def multi_label_data(rng, n=300, c=6, no_positives=(), no_negatives=()):
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[:, list(no_positives)] = 0
    y[:, list(no_negatives)] = 1
    scores = expit(rng.normal(size=(n, c)) + 1.2 * (2 * y - 1))
    return y, scores


def sk_prf(y, pred, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return precision_recall_fscore_support(y, pred, labels=labels, average="macro",
                                               zero_division=0)[:3]


def test_one_label_against_sklearn():
    rng = np.random.default_rng(0)
    y, scores = one_label_data(rng)
    names = ["mel", "nv", "bcc", "ak", "bkl"]
    m = classification_metrics(y, scores, multilabel=False, class_names=names)
    pred = scores.argmax(1)
    p, r, f = sk_prf(y, pred, list(range(5)))
    np.testing.assert_allclose([m["precision_macro"], m["recall_macro"], m["f1_macro"]], [p, r, f])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    per_p, per_r, per_f, support = precision_recall_fscore_support(y, pred, zero_division=0)
    for k, name in enumerate(names):
        entry = m["per_class"][name]
        np.testing.assert_allclose([entry["precision"], entry["recall"], entry["f1"]],
                                   [per_p[k], per_r[k], per_f[k]])
        assert entry["support"] == support[k]
        assert entry["auroc"] == pytest.approx(roc_auc_score(y == k, scores[:, k]))
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, scores, multi_class="ovr"))
    assert m["absent_classes"] == [] and m["macro_classes"] == names


def test_one_label_absent_class_reported_and_excluded():
    rng = np.random.default_rng(1)
    y, scores = one_label_data(rng, absent=(2,))
    pred = scores.argmax(1)
    assert np.any(pred == 2)  # the absent class is still predicted: false positives
    m = classification_metrics(y, scores, multilabel=False)
    present = [0, 1, 3, 4]
    p, r, f = sk_prf(y, pred, present)
    np.testing.assert_allclose([m["precision_macro"], m["recall_macro"], m["f1_macro"]], [p, r, f])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["absent_classes"] == ["2"] and m["macro_classes"] == ["0", "1", "3", "4"]
    assert m["per_class"]["2"]["auroc"] is None and m["auroc_undefined"] == ["2"]
    assert m["per_class"]["2"]["recall"] is None and m["per_class"]["2"]["precision"] == 0.0
    assert m["auroc_macro"] == pytest.approx(
        np.mean([roc_auc_score(y == k, scores[:, k]) for k in present]))
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no NaN anywhere


def test_multi_label_against_sklearn_with_absent_and_all_positive_labels():
    rng = np.random.default_rng(2)
    y, scores = multi_label_data(rng, no_positives=(3,), no_negatives=(5,))
    m = classification_metrics(y, scores, multilabel=True, threshold=0.5)
    pred = (scores >= 0.5).astype(int)
    present = [0, 1, 2, 4, 5]
    p, r, f = sk_prf(y, pred, present)
    np.testing.assert_allclose([m["precision_macro"], m["recall_macro"], m["f1_macro"]], [p, r, f])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))  # subset accuracy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # label 5 has no negatives: BA is its TPR
        per_ba = [balanced_accuracy_score(y[:, k], pred[:, k]) for k in present]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(per_ba))
    for k in (0, 1, 2, 4):
        assert m["per_class"][str(k)]["auroc"] == pytest.approx(roc_auc_score(y[:, k], scores[:, k]))
    assert m["absent_classes"] == ["3"]
    assert m["auroc_undefined"] == ["3", "5"] and m["auroc_classes"] == ["0", "1", "2", "4"]
    assert m["auroc_macro"] == pytest.approx(
        np.mean([roc_auc_score(y[:, k], scores[:, k]) for k in (0, 1, 2, 4)]))
    json.dumps(m, allow_nan=False)


def test_per_class_thresholds_and_tuning():
    rng = np.random.default_rng(3)
    y, scores = multi_label_data(rng, no_positives=(4,))
    thresholds = tune_thresholds(y, scores, multilabel=True)
    assert thresholds[4] == 0.5  # no positives: the default stays
    for k in (0, 1, 2, 3, 5):
        # Brute force over every distinct score (and 0.5): F1 = 2 TP / (#predicted + #positive).
        candidates = np.append(np.unique(scores[:, k]), 0.5)
        pred = scores[None, :, k] >= candidates[:, None]  # [T, N]
        best = np.max(2 * (pred & (y[None, :, k] == 1)).sum(1) / (pred.sum(1) + y[:, k].sum()))
        assert f1_score(y[:, k], scores[:, k] >= thresholds[k]) == pytest.approx(best)
    m = classification_metrics(y, scores, multilabel=True, thresholds=thresholds)
    pred = (scores >= thresholds[None, :]).astype(int)
    np.testing.assert_allclose(m["f1_macro"], sk_prf(y, pred, [0, 1, 2, 3, 5])[2])
    assert m["f1_macro"] >= classification_metrics(y, scores, multilabel=True)["f1_macro"]


def test_tuned_metrics_tune_on_validation_and_score_test():
    """Thresholds from a brute-force search with scikit-learn's f1_score over every validation
    score (ties to the highest), then scikit-learn's macro F1 of the test split at them."""
    rng = np.random.default_rng(11)
    val_y, val_scores = multi_label_data(rng, n=120, c=4, no_positives=(3,))
    test_y, test_scores = multi_label_data(rng, n=150, c=4)
    ref = np.full(4, 0.5)
    for k in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f1s = {t: f1_score(val_y[:, k], val_scores[:, k] >= t, zero_division=0)
                   for t in np.unique(val_scores[:, k])}
        best = max(f1s.values())
        ref[k] = max(t for t, f in f1s.items() if f == best)
    m = tuned_metrics(val_y, val_scores, test_y, test_scores, class_names=list("abcd"))
    np.testing.assert_allclose(m["thresholds"], ref)
    pred = (test_scores >= ref[None, :]).astype(int)
    np.testing.assert_allclose(m["f1_macro"], sk_prf(test_y, pred, [0, 1, 2, 3])[2])
    np.testing.assert_allclose(m["per_class"]["b"]["f1"], f1_score(test_y[:, 1], pred[:, 1]))
    json.dumps(m, allow_nan=False)


def test_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(4)
    y, scores = multi_label_data(rng, n=120, c=3)
    scores = np.round(scores, 1)  # heavy ties
    m = classification_metrics(y, scores, multilabel=True)
    for k in range(3):
        assert m["per_class"][str(k)]["auroc"] == pytest.approx(roc_auc_score(y[:, k], scores[:, k]))


def test_ece_hand_derived_one_label():
    # Confidences 0.9 (right), 0.92 (wrong) share bin (13/15, 14/15]: |0.5 - 0.91| * 2/4 = 0.205;
    # 0.7 (right) alone in its bin: 0.3/4 = 0.075; 0.55 (right): 0.45/4 = 0.1125.  Sum 0.3925.
    scores = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0])
    assert classification_metrics(y, scores, multilabel=False)["ece"] == pytest.approx(0.3925)


def test_ece_hand_derived_multi_label():
    # Label probabilities 0.9 (pos) alone: 0.1/4; 0.7 (neg) alone: 0.7/4; 0.1 (neg) and 0.12 (pos)
    # share bin (1/15, 2/15]: positive rate 0.5, mean prob 0.11 -> 0.39 * 2/4.  Sum 0.395.
    scores = np.array([[0.9, 0.1], [0.7, 0.12]])
    y = np.array([[1, 0], [0, 1]])
    assert classification_metrics(y, scores, multilabel=True)["ece"] == pytest.approx(0.395)


def test_mask_drops_padded_rows():
    rng = np.random.default_rng(5)
    y, scores = one_label_data(rng, n=50)
    mask = np.ones(50)
    mask[40:] = 0
    masked = classification_metrics(y, scores, multilabel=False, mask=mask)
    subset = classification_metrics(y[:40], scores[:40], multilabel=False)
    assert masked == subset and masked["num_examples"] == 40


def test_scores_from_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.3, -1.2, 2.0]])
    np.testing.assert_allclose(softmax(logits), sp_softmax(logits, axis=1), atol=1e-12)
    np.testing.assert_allclose(sigmoid(logits), expit(logits), atol=1e-12)
    np.testing.assert_allclose(scores_from_logits(logits, multilabel=True), expit(logits))
    assert np.all(np.isfinite(scores_from_logits(logits, multilabel=False)))


def test_bad_inputs_raise():
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="scores_from_logits"):
        classification_metrics(y, np.array([[3.0, -1.0], [0.2, 0.1]]), multilabel=False)
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(y, np.array([[0.3, 0.3], [0.2, 0.8]]), multilabel=False)
    with pytest.raises(ValueError, match="multi-hot"):
        classification_metrics(y, np.full((2, 2), 0.5), multilabel=True)
    with pytest.raises(ValueError, match="multi-label tasks only"):
        classification_metrics(y, np.full((2, 2), 0.5), multilabel=False, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics(y, np.full((2, 2), 0.5), multilabel=False, class_names=["a"])
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics(y, np.full((2, 2), 0.5), multilabel=False, mask=[0, 0])
    with pytest.raises(ValueError, match="multi-label tasks only"):
        tune_thresholds(y, np.full((2, 2), 0.5), multilabel=False)
