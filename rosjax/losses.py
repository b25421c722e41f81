"""Supervised and knowledge-distillation losses (paper eq. 1-4), one- and multi-label.

Conventions (shared by the teacher step, the distillation step and the RL baseline):

* One-label task: `labels` are int `[B]`; the supervised loss is softmax cross-entropy and the
  distillation divergence is KL(softmax(t/tau) || softmax(s/tau)) summed over classes.
* Multi-label task: `labels` are float multi-hot `[B, C]`; the supervised loss is binary
  cross-entropy summed over labels, the divergence is the Bernoulli KL between
  sigmoid(t/tau) and sigmoid(s/tau) per label, summed over labels.
* Every loss is a mean over the (masked) examples of the batch.  The paper's eq. (4) sums over
  examples; a mean keeps the learning rate independent of the batch size and only rescales.
* Class weighting (`--optim.class_weighting=balanced`, off by default; see
  `class_weights`): `class_weights` [C] scales each example's CE by the weight of its label
  (one-label; the batch mean stays a plain mean, and balanced weights average 1 over the
  training rows) or, multi-label, is BCE's per-label positive weight (torch's `pos_weight`).
  None, the default, leaves every loss and program exactly as without it.
* Everything is computed in log space (`log_softmax`, `log_sigmoid`), so no probability that
  rounds to zero is ever passed to a log: losses and gradients stay finite for logits of
  +-1e4.  Logits are cast to float32 first (bf16 compute still returns float32 logits).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CLASS_WEIGHTINGS = ("none", "balanced")


def class_weights(labels, num_classes: int, *, multilabel: bool, kind: str = "balanced"):
    """Host-side (numpy) class weights [C] from the training labels, or None for kind='none'.

    One-label (int labels [N]): w_c = N / (C * n_c), scikit-learn's
    compute_class_weight('balanced'). Multi-label (multi-hot [N, C]): the positive weight
    pos_weight_c = n_neg_c / n_pos_c of torch's BCEWithLogitsLoss. A class with no example
    (or, multi-label, a label that is always or never positive) gets 1: its weight would
    never apply, or would silence the label.
    """
    if kind not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {CLASS_WEIGHTINGS}, got {kind!r}")
    if kind == "none":
        return None
    labels = np.asarray(labels)
    if multilabel:
        y = labels.reshape(len(labels), num_classes) > 0.5
        pos = y.sum(axis=0).astype(np.float64)
        neg = len(y) - pos
        ok = (pos > 0) & (neg > 0)
        w = np.where(ok, neg / np.maximum(pos, 1), 1.0)
    else:
        counts = np.bincount(labels.astype(np.int64).ravel(), minlength=num_classes)[:num_classes]
        w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 1.0)
    return w.astype(np.float32)


def _masked_mean(values, mask):
    """Mean of `values` [B] over rows with mask != 0 (0 when every row is masked out)."""
    if mask is None:
        return jnp.mean(values)
    mask = jnp.asarray(mask, jnp.float32)  # [B]
    if mask.shape != values.shape:
        raise ValueError(f"losses: mask has shape {mask.shape}, expected {values.shape} "
                         "(one entry per example)")
    total = jnp.sum(mask)
    return jnp.where(total > 0, jnp.sum(values * mask) / jnp.maximum(total, 1e-12), 0.0)


def _check_logits_labels(logits, labels, multilabel):
    if logits.ndim != 2:
        raise ValueError(f"losses: logits must be [B, C], got shape {logits.shape}")
    if multilabel:
        if labels.shape != logits.shape:
            raise ValueError(f"losses: multilabel=True needs multi-hot labels [B, C]={logits.shape}, "
                             f"got shape {labels.shape}")
    else:
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"losses: multilabel=False needs int labels [B]={logits.shape[:1]}, "
                             f"got shape {labels.shape}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"losses: multilabel=False needs integer labels, got {labels.dtype}")


def _check_class_weights(class_weights, num_classes):
    w = jnp.asarray(class_weights, jnp.float32)
    if w.shape != (num_classes,):
        raise ValueError(f"losses: class_weights must be [C]=({num_classes},), got {w.shape}")
    return w


def supervised_per_example(logits, labels, *, multilabel, class_weights=None):
    """Per-example supervised loss [B]: softmax CE (one-label) or BCE summed over labels.

    class_weights: optional [C] (see `class_weights`): one-label, example i's CE times
    class_weights[label_i]; multi-label, the positive term of label c times class_weights[c].
    """
    logits = jnp.asarray(logits, jnp.float32)  # [B, C]
    labels = jnp.asarray(labels)
    _check_logits_labels(logits, labels, multilabel)
    if class_weights is not None:
        class_weights = _check_class_weights(class_weights, logits.shape[-1])
    if multilabel:
        y = labels.astype(jnp.float32)  # [B, C]
        positive = y * jax.nn.log_sigmoid(logits)
        if class_weights is not None:
            positive = class_weights * positive  # pos_weight
        # -[y log sigmoid(x) + (1 - y) log sigmoid(-x)], stable for any x.
        bce = -(positive + (1.0 - y) * jax.nn.log_sigmoid(-logits))
        return jnp.sum(bce, axis=-1)  # [B]
    log_p = jax.nn.log_softmax(logits, axis=-1)  # [B, C]
    index = labels[:, None].astype(jnp.int32)
    ce = -jnp.take_along_axis(log_p, index, axis=-1)[:, 0]  # [B]
    if class_weights is not None:
        ce = class_weights[index[:, 0]] * ce
    return ce


def supervised_loss(logits, labels, *, multilabel, mask=None, class_weights=None):
    """Mean supervised loss over the (masked) batch.

    Args:
      logits: [B, C] model outputs.
      labels: int [B] (one-label) or float multi-hot [B, C] (multi-label).
      multilabel: task flag.
      mask: optional [B] weights; padded rows have mask 0.
      class_weights: optional [C] class (one-label) or positive (multi-label) weights.
    Returns:
      scalar float32.
    """
    return _masked_mean(supervised_per_example(logits, labels, multilabel=multilabel,
                                               class_weights=class_weights), mask)


def _kl_per_example(student_logits, teacher_logits, tau, multilabel):
    """Unscaled KL(teacher || student) at temperature tau; [..., B, C] -> [..., B]."""
    s = student_logits / tau
    t = teacher_logits / tau
    if multilabel:
        log_q, log_1mq = jax.nn.log_sigmoid(t), jax.nn.log_sigmoid(-t)
        log_p, log_1mp = jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s)
        kl = jnp.exp(log_q) * (log_q - log_p) + jnp.exp(log_1mq) * (log_1mq - log_1mp)
    else:
        log_q = jax.nn.log_softmax(t, axis=-1)
        log_p = jax.nn.log_softmax(s, axis=-1)
        kl = jnp.exp(log_q) * (log_q - log_p)
    return jnp.sum(kl, axis=-1)


def _check_tau(tau):
    if isinstance(tau, (int, float)) and not tau > 0:
        raise ValueError(f"losses: tau must be > 0, got {tau}")


def kd_divergence(student_logits, teacher_logits, *, tau, multilabel):
    """Per-example tau^2 * KL(teacher || student) for one teacher.

    Args:
      student_logits: [B, C].
      teacher_logits: [B, C] (one teacher; treated as a constant: no gradient flows to it).
      tau: temperature (> 0).
      multilabel: softmax KL over classes (False) or Bernoulli KL summed over labels (True).
    Returns:
      [B] float32, the tau^2-scaled divergence (the scale of the KD term of eq. 4).
    """
    _check_tau(tau)
    s = jnp.asarray(student_logits, jnp.float32)  # [B, C]
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))  # [B, C]
    if s.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"kd_divergence: student {s.shape} and teacher {t.shape} logits must both "
                         "be [B, C]")
    return tau ** 2 * _kl_per_example(s, t, tau, multilabel)  # [B]


def kd_loss(student_logits, teacher_logits, labels, teacher_weights, *, tau, alpha, multilabel,
            mask=None, class_weights=None):
    """RoS-KD objective, paper eq. (4), averaged over the batch.

      loss = alpha * tau^2 * sum_m w_m KL(q_m || p) + (1 - alpha) * supervised

    with q_m = softmax(t_m / tau), p = softmax(s / tau) (one-label; Bernoulli per label for
    multi-label).  With weights 1/K this is baseline III (mean of the teachers' KL); with K=1 and
    weight 1, baseline II (single-teacher KD).

    Args:
      student_logits: [B, C].
      teacher_logits: [K, B, C]; constants (stop_gradient), teachers are frozen.
      labels: int [B] or float multi-hot [B, C] (the possibly noisy training labels).
      teacher_weights: [K] (one draw for the batch) or [K, B] (one draw per example).
      tau: temperature; alpha: weight of the KD term in [0, 1].
      multilabel: task flag.
      mask: optional [B]; padded rows have mask 0.
      class_weights: optional [C] weights of the supervised term (`supervised_per_example`).
    Returns:
      (loss scalar, aux) with aux = {'kd': weighted KD term (tau^2-scaled, batch mean),
      'ce': supervised term, 'kl_per_teacher': [K] batch-mean tau^2-scaled KL of each teacher}.
    """
    _check_tau(tau)
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
    s = jnp.asarray(student_logits, jnp.float32)  # [B, C]
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))  # [K, B, C]
    if s.ndim != 2 or t.ndim != 3 or t.shape[1:] != s.shape:
        raise ValueError(f"kd_loss: need student [B, C] and teacher [K, B, C] logits, got "
                         f"{s.shape} and {t.shape}")
    num_teachers, batch = t.shape[:2]
    w = jnp.asarray(teacher_weights, jnp.float32)
    if w.shape == (num_teachers,):
        w = jnp.broadcast_to(w[:, None], (num_teachers, batch))  # [K, B]
    elif w.shape != (num_teachers, batch):
        raise ValueError(f"kd_loss: teacher_weights must be [K]=({num_teachers},) or "
                         f"[K, B]=({num_teachers}, {batch}), got {w.shape}")
    kl = tau ** 2 * _kl_per_example(s[None], t, tau, multilabel)  # [K, B]
    kd = _masked_mean(jnp.sum(w * kl, axis=0), mask)  # scalar
    ce = supervised_loss(s, labels, multilabel=multilabel, mask=mask, class_weights=class_weights)
    kl_per_teacher = jax.vmap(lambda k: _masked_mean(k, mask))(kl)  # [K]
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"kd": kd, "ce": ce, "kl_per_teacher": kl_per_teacher}
