"""Classification metrics over a whole split (numpy, host side; JSON-serialisable results).

Inputs are *probabilities*, not logits: `y_score` [N, C] is softmax output (one-label) or
per-label sigmoid output (multi-label); thresholds and calibration are defined on
probabilities.  `scores_from_logits` turns model logits into these scores.

Conventions (paper Table I reports macro precision / recall / F1):

* Predictions: one-label -> argmax of the scores; multi-label -> score >= threshold per label
  (`threshold`, or per-class `thresholds`, e.g. from `tune_thresholds` on validation;
  `tuned_metrics` does both: tunes on validation, scores the test split).
* Present classes are those with at least one positive in `y_true`.  Macro precision, recall,
  F1 and balanced accuracy average over present classes only; the result lists them under
  'macro_classes' and the others under 'absent_classes'.  Macro F1 is the mean of per-class F1
  (scikit-learn's definition), not the F1 of macro P and R.  A present class that is never
  predicted has precision 0 (scikit-learn's zero_division=0).
* Per-class AUROC is None when a class has no positives or no negatives ('auroc_undefined');
  'auroc_macro' is the mean over the classes where it is defined ('auroc_classes').
  One-label AUROC is one-vs-rest on the softmax probabilities.  AUROC is the rank statistic with
  average ranks for ties, equal to scikit-learn's trapezoidal roc_auc_score.
* accuracy: one-label top-1; multi-label exact-match (subset) accuracy: all C labels right.
* balanced accuracy: one-label = macro recall over present classes (ISIC's official metric,
  scikit-learn's balanced_accuracy_score); multi-label = mean over present labels of each
  label's balanced accuracy (mean of TPR and TNR; TPR alone for a label with no negatives).
* ECE, 15 equal-width bins (lo, hi] of [0, 1] (a score of exactly 0 falls in the first bin):
  one-label bins the max-probability confidence and compares it with top-1 accuracy in each bin;
  multi-label bins every (example, label) probability and compares it with the rate of positive
  labels in the bin (calibration of P(label)).  ECE = sum_b (n_b / n) |acc_b - conf_b|.
* `mask` [N] drops padded rows (mask 0) before anything is computed.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits, axis=-1):
    """Numerically stable softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(logits):
    """Numerically stable logistic function in float64."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float64)))


def scores_from_logits(logits, *, multilabel):
    """Probabilities [N, C] from logits [N, C]: sigmoid (multi-label) or softmax (one-label)."""
    return sigmoid(logits) if multilabel else softmax(logits, axis=-1)


def _prepare(y_true, y_score, multilabel, mask):
    """Validates and masks inputs -> (y_true, y_score float64 [N, C])."""
    y_score = np.asarray(y_score, np.float64)
    y_true = np.asarray(y_true)
    if y_score.ndim != 2:
        raise ValueError(f"metrics: y_score must be [N, C] probabilities, got shape {y_score.shape}")
    n, c = y_score.shape
    if multilabel:
        if y_true.shape != (n, c):
            raise ValueError(f"metrics: multilabel=True needs y_true multi-hot [N, C]=({n}, {c}), got "
                             f"{y_true.shape}")
        if not np.all((y_true == 0) | (y_true == 1)):
            raise ValueError("metrics: multi-label y_true must contain only 0 and 1")
        y_true = y_true.astype(np.int64)
    else:
        if y_true.shape != (n,):
            raise ValueError(f"metrics: multilabel=False needs int y_true [N]=({n},), got {y_true.shape}")
        if not np.all(np.equal(np.mod(y_true, 1), 0)):
            raise ValueError("metrics: one-label y_true must be integer class indices")
        y_true = y_true.astype(np.int64)
        if n and (y_true.min() < 0 or y_true.max() >= c):
            raise ValueError(f"metrics: y_true has class indices outside [0, {c})")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (n,):
            raise ValueError(f"metrics: mask must be [N]=({n},), got {mask.shape}")
        keep = mask != 0
        y_true, y_score = y_true[keep], y_score[keep]
    if y_score.shape[0] == 0:
        raise ValueError("metrics: no examples (empty split or everything masked out)")
    if not np.all(np.isfinite(y_score)) or y_score.min() < 0 or y_score.max() > 1:
        raise ValueError("metrics: y_score must be finite probabilities in [0, 1]; for logits use "
                         "scores_from_logits(logits, multilabel=...)")
    if not multilabel and np.max(np.abs(y_score.sum(axis=1) - 1.0)) > 1e-3:
        raise ValueError("metrics: one-label y_score rows must sum to 1 (softmax probabilities); "
                         "for logits use scores_from_logits(logits, multilabel=False)")
    return y_true, y_score


def _one_hot(y_true, num_classes):
    return (y_true[:, None] == np.arange(num_classes)[None, :]).astype(np.int64)  # [N, C]


def _predict(y_score, multilabel, threshold, thresholds):
    """Binary predictions [N, C]: argmax one-hot or per-label thresholding."""
    n, c = y_score.shape
    if not multilabel:
        if thresholds is not None:
            raise ValueError("metrics: thresholds apply to multi-label tasks only (one-label predicts "
                             "the argmax)")
        return _one_hot(np.argmax(y_score, axis=1), c)
    if thresholds is None:
        thresholds = np.full((c,), float(threshold))
    thresholds = np.asarray(thresholds, np.float64)
    if thresholds.shape != (c,):
        raise ValueError(f"metrics: thresholds must be [C]=({c},), got {thresholds.shape}")
    return (y_score >= thresholds[None, :]).astype(np.int64)


def _ratio(num, den):
    """num / den as a python float, None when den == 0."""
    return float(num) / float(den) if den > 0 else None


def auroc(y_true_binary, score):
    """Area under the ROC curve of one binary problem; None without positives or negatives.

    Mann-Whitney form: (sum of positives' ranks - P(P+1)/2) / (P N) with average ranks for tied
    scores, which equals the trapezoidal area scikit-learn computes.
    """
    y = np.asarray(y_true_binary).astype(bool)  # [N]
    s = np.asarray(score, np.float64)  # [N]
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each unique score
    ranks = avg_rank[inverse]  # [N]
    return float((ranks[y].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def expected_calibration_error(y_true, y_score, *, multilabel, num_bins=ECE_BINS):
    """ECE with `num_bins` equal-width bins (lo, hi]; see the module docstring for both tasks."""
    if multilabel:
        conf = y_score.reshape(-1)  # [N*C] probability of each label
        hit = y_true.reshape(-1).astype(np.float64)  # [N*C] label is positive
    else:
        conf = y_score.max(axis=1)  # [N]
        hit = (y_score.argmax(axis=1) == y_true).astype(np.float64)  # [N]
    bins = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    conf_sum = np.bincount(bins, weights=conf, minlength=num_bins)
    hit_sum = np.bincount(bins, weights=hit, minlength=num_bins)
    return float(np.sum(np.abs(hit_sum - conf_sum)) / conf.size)


def classification_metrics(y_true, y_score, *, multilabel, threshold=0.5, thresholds=None,
                           class_names=None, mask=None):
    """All metrics of one split; see the module docstring for the conventions.

    Args:
      y_true: int [N] (one-label) or multi-hot [N, C] (multi-label).
      y_score: probabilities [N, C].
      multilabel: task flag.
      threshold: multi-label decision threshold for every label.
      thresholds: optional per-class multi-label thresholds [C] (override `threshold`).
      class_names: optional C names used as keys of 'per_class' (default '0'..'C-1').
      mask: optional [N]; rows with mask 0 are dropped.
    Returns:
      dict of python floats / ints / None / str lists, JSON-serialisable.
    """
    y_true, y_score = _prepare(y_true, y_score, multilabel, mask)
    n, c = y_score.shape
    names = [str(i) for i in range(c)] if class_names is None else [str(s) for s in class_names]
    if len(names) != c:
        raise ValueError(f"metrics: class_names has {len(names)} names for {c} classes")
    truth = y_true if multilabel else _one_hot(y_true, c)  # [N, C]
    pred = _predict(y_score, multilabel, threshold, thresholds)  # [N, C]

    tp = np.sum(truth * pred, axis=0)  # [C]
    fp = np.sum((1 - truth) * pred, axis=0)
    fn = np.sum(truth * (1 - pred), axis=0)
    tn = np.sum((1 - truth) * (1 - pred), axis=0)
    support = tp + fn
    present = support > 0  # [C]

    per_class = {}
    for k, name in enumerate(names):
        precision = _ratio(tp[k], tp[k] + fp[k])
        if precision is None and present[k]:
            precision = 0.0  # never predicted: scikit-learn's zero_division=0
        recall = _ratio(tp[k], support[k])
        f1 = _ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]) if present[k] else None
        entry = {"precision": precision, "recall": recall, "f1": f1,
                 "auroc": auroc(truth[:, k], y_score[:, k]), "support": int(support[k])}
        if multilabel:
            rates = [r for r in (recall, _ratio(tn[k], tn[k] + fp[k])) if r is not None]
            entry["balanced_accuracy"] = float(np.mean(rates)) if present[k] else None
        per_class[name] = entry

    present_names = [name for k, name in enumerate(names) if present[k]]
    auroc_names = [name for name in names if per_class[name]["auroc"] is not None]
    def macro(key, keys):
        return (float(np.mean([per_class[s][key] for s in keys])) if keys else None)

    if multilabel:
        accuracy = float(np.mean(np.all(pred == truth, axis=1)))
        balanced = macro("balanced_accuracy", present_names)
    else:
        accuracy = float(np.mean(np.argmax(y_score, axis=1) == y_true))
        balanced = macro("recall", present_names)

    return {
        "multilabel": bool(multilabel),
        "num_examples": int(n),
        "num_classes": int(c),
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "precision_macro": macro("precision", present_names),
        "recall_macro": macro("recall", present_names),
        "f1_macro": macro("f1", present_names),
        "auroc_macro": macro("auroc", auroc_names),
        "ece": expected_calibration_error(y_true, y_score, multilabel=multilabel),
        "macro_classes": present_names,
        "absent_classes": [name for k, name in enumerate(names) if not present[k]],
        "auroc_classes": auroc_names,
        "auroc_undefined": [name for name in names if per_class[name]["auroc"] is None],
        "per_class": per_class,
    }


def tune_thresholds(y_true, y_score, *, multilabel, default=0.5, mask=None):
    """Per-class thresholds [C] maximising each class's F1 (multi-label; fit on validation).

    For class k the candidates are the distinct validation scores t (predict positive when
    score >= t); the best F1 wins, ties going to the highest threshold.  A class without
    positives keeps `default`.  Pass the result as `thresholds=` to `classification_metrics`.
    """
    if not multilabel:
        raise ValueError("metrics: tune_thresholds applies to multi-label tasks only (one-label "
                         "predicts the argmax)")
    y_true, y_score = _prepare(y_true, y_score, True, mask)
    out = np.full((y_score.shape[1],), float(default))
    for k in range(y_score.shape[1]):
        num_pos = y_true[:, k].sum()
        if num_pos == 0:
            continue
        order = np.argsort(-y_score[:, k], kind="stable")
        s, y = y_score[order, k], y_true[order, k]  # scores descending
        tp = np.cumsum(y)  # [N] true positives when the first i+1 are predicted positive
        last_of_tie = np.append(s[1:] != s[:-1], True)  # a threshold keeps whole tie groups
        num_pred = np.arange(1, s.size + 1)
        f1 = np.where(last_of_tie, 2.0 * tp / (num_pred + num_pos), -1.0)
        out[k] = s[int(np.argmax(f1))]
    return out


def decisions(y_true, y_score, *, multilabel, threshold=0.5, thresholds=None):
    """(truth, pred), both 0/1 int [N, C]: the true labels and the predictions that
    `classification_metrics` scores (argmax one-hot, or per-label thresholding), for statistics
    that resample examples (rosjax.eval.stats)."""
    y_true, y_score = _prepare(y_true, y_score, multilabel, None)
    truth = y_true if multilabel else _one_hot(y_true, y_score.shape[1])
    return truth, _predict(y_score, multilabel, threshold, thresholds)



def tuned_metrics(val_true, val_score, y_true, y_score, *, class_names=None, val_mask=None, mask=None):
    """Multi-label metrics of one split at per-class thresholds tuned on another (validation).

    The thresholds maximise each class's validation F1 (`tune_thresholds`), then score
    `y_true` / `y_score` [N, C] (the test split) with `classification_metrics(thresholds=)`:
    NIH's labels are rare and a fixed 0.5 predicts almost no positive, so macro F1 at 0.5 mostly
    measures calibration.  Returns the metrics dict plus 'thresholds' (a list of C floats).
    """
    thresholds = tune_thresholds(val_true, val_score, multilabel=True, mask=val_mask)  # [C]
    result = classification_metrics(y_true, y_score, multilabel=True, thresholds=thresholds,
                                    class_names=class_names, mask=mask)
    return {**result, "thresholds": [float(t) for t in thresholds]}
