"""Adversarial attacks for the robustness table (paper Table II): FGSM and PGD, l2 or linf.

Conventions (see notes/kd_methods.md section 6):

* Images live in [0, 1] pixel space; the models normalise internally, so `eps` is in pixel
  units over all H*W*C entries of one example (paper: l2, eps = 128/255).
* `apply_fn(x) -> logits`: x float32 `[B, H, W, C]` in [0, 1], logits `[B, C]`, evaluated in
  eval mode, e.g. `functools.partial(model.apply, variables, train=False)`.
* The attacked loss is the supervised loss against the TRUE labels: softmax cross-entropy
  (one-label, int labels `[B]`) or binary cross-entropy summed over labels (multi-label,
  multi-hot `[B, C]`).  Gradients are of the batch SUM of per-example losses, so row i of the
  gradient is the gradient of example i's own loss (no 1/B factor, no cross-talk).
* Steepest-ascent step: l2 -> `size * g / max(||g||_2, 1e-12)` per example; linf ->
  `size * sign(g)`.  FGSM takes one step of size eps (the l2 variant is Goodfellow's "fast
  gradient method" FGM-L2, as in cleverhans) and clips to [0, 1].
* PGD (Madry et al.): optional random start, then `steps` ascent steps of `step_size`
  (default 2.5 * eps / steps); after every step the perturbation is projected back onto the
  eps-ball around the clean image (l2: rescale to norm <= eps; linf: clip to [-eps, eps]) and
  the image clipped to [0, 1].  Clipping to [0, 1] can only shrink the perturbation, so it
  stays in the ball.
* Random start (then clipped to [0, 1]): linf -> uniform in the cube [-eps, eps]^d; l2 ->
  uniform in the VOLUME of the l2 ball.  In image dimensions almost all of that volume lies
  next to the sphere, so the start is practically at radius eps; torchattacks instead draws
  the radius uniformly in [0, eps].
* All functions are jittable (`norm` and `multilabel` are Python-level choices, `eps` and
  `step_size` may be traced, the PGD loop is a `lax.fori_loop`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rosjax.losses import supervised_per_example

PAPER_EPS = 128 / 255  # Paper Table II: l2 radius in [0, 1] pixel units.
_TINY = 1e-12          # Guard against dividing by a zero gradient / perturbation norm.
METHODS = ("fgsm", "pgd")


def canonical_norm(norm) -> str:
    """Return "l2" or "linf" for 2, "2", "l2", np.inf, "inf", "linf"; ValueError otherwise."""
    if isinstance(norm, str):
        name = norm.strip().lower()
        if name in ("2", "l2"):
            return "l2"
        if name in ("inf", "linf"):
            return "linf"
    elif isinstance(norm, (int, float, np.number)) and not isinstance(norm, bool):
        if norm == 2:
            return "l2"
        if math.isinf(norm) and norm > 0:
            return "linf"
    raise ValueError(f"attacks: norm must be 2 or inf (also '2', 'l2', 'inf', 'linf', np.inf), "
                     f"got {norm!r}")


def _check_static(eps, steps=None, step_size=None):
    """Reject bad concrete hyper-parameters (traced values are the caller's responsibility)."""
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"attacks: eps must be >= 0, got {eps!r}")
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"attacks: steps must be >= 1, got {steps!r}")
    if isinstance(step_size, (int, float)) and not step_size >= 0:
        raise ValueError(f"attacks: step_size must be >= 0, got {step_size!r}")


def _l2(v):
    """Per-example l2 norm over all non-batch axes, kept broadcastable: [B, 1, ..., 1]."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def input_gradient(apply_fn: Callable, x, y, *, multilabel: bool):
    """Gradient of the summed per-example supervised loss wrt the images: [B, H, W, C]."""
    def total_loss(images):
        return jnp.sum(supervised_per_example(apply_fn(images), y, multilabel=multilabel))
    return jax.grad(total_loss)(x)


def _ascent_step(g, size, norm):
    """Steepest-ascent step of length `size` in the given norm, per example."""
    if norm == "l2":
        return size * g / jnp.maximum(_l2(g), _TINY)
    return size * jnp.sign(g)


def _project(delta, eps, norm):
    """Project each example's perturbation onto the eps-ball (l2 rescale or linf clip)."""
    if norm == "l2":
        return delta * jnp.minimum(1.0, eps / jnp.maximum(_l2(delta), _TINY))
    return jnp.clip(delta, -eps, eps)


def _random_start(key, shape, eps, norm):
    """A perturbation [B, H, W, C] drawn uniformly from the eps-ball (see the module docstring).

    Draws are made in the flat [B, H*W*C] shape: XLA:CPU compiles the counter-based generator
    several times faster for a 2-D than for a 4-D shape.
    """
    batch, dim = shape[0], math.prod(shape[1:])
    if norm == "linf":
        return (eps * jax.random.uniform(key, (batch, dim), jnp.float32, -1.0, 1.0)).reshape(shape)
    # The first `dim` coordinates of a uniform point on the unit sphere of R^(dim + 2) are
    # uniform in the unit ball of R^dim (Voelker, Gosmann & Stewart 2017): one Gaussian draw.
    z = jax.random.normal(key, (batch, dim + 2), jnp.float32)  # [B, D + 2]
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), _TINY)
    return (eps * z[:, :dim]).reshape(shape)


def fgsm(apply_fn: Callable, x, y, *, eps=PAPER_EPS, norm=2, multilabel: bool = False):
    """Fast gradient (sign) method: one ascent step of size eps, then clip to [0, 1].

    Args:
      apply_fn: x [B, H, W, C] in [0, 1] -> logits [B, C] (eval mode).
      x: clean images [B, H, W, C] in [0, 1].
      y: true labels, int [B] (one-label) or multi-hot [B, C] (multi-label).
      eps: radius in pixel units (paper: 128/255).
      norm: 2 (paper) or inf.
      multilabel: task flag (selects CE or summed BCE).
    Returns:
      adversarial images [B, H, W, C], float32 in [0, 1].
    """
    norm = canonical_norm(norm)
    _check_static(eps)
    x = jnp.asarray(x, jnp.float32)  # [B, H, W, C]
    g = input_gradient(apply_fn, x, jnp.asarray(y), multilabel=multilabel)
    return jnp.clip(x + _ascent_step(g, eps, norm), 0.0, 1.0)


def pgd(apply_fn: Callable, x, y, key, *, eps=PAPER_EPS, norm=2, steps: int = 10,
        step_size=None, random_start: bool = True, multilabel: bool = False):
    """Projected gradient descent (ascent on the loss) inside the eps-ball around x.

    Args:
      apply_fn, x, y, eps, norm, multilabel: as in `fgsm`.
      key: jax.random key of the random start (unused when random_start=False).
      steps: number of ascent steps (static int, or traced).
      step_size: length of each step; None -> 2.5 * eps / steps.
      random_start: start from a uniform point of the eps-ball instead of x.
    Returns:
      adversarial images [B, H, W, C], float32 in [0, 1], with ||x_adv - x|| <= eps.
    """
    norm = canonical_norm(norm)
    _check_static(eps, steps, step_size)
    if step_size is None:
        step_size = 2.5 * eps / steps
    x = jnp.asarray(x, jnp.float32)  # [B, H, W, C]
    y = jnp.asarray(y)
    x_adv = x
    if random_start:
        x_adv = jnp.clip(x + _random_start(key, x.shape, eps, norm), 0.0, 1.0)

    def step(_, x_adv):
        g = input_gradient(apply_fn, x_adv, y, multilabel=multilabel)
        delta = _project(x_adv + _ascent_step(g, step_size, norm) - x, eps, norm)
        return jnp.clip(x + delta, 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, x_adv)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """One attack setting of Table II (hashable: it is a static argument of the jitted step)."""
    method: str = "pgd"               # "fgsm" (one step of size eps) or "pgd".
    norm: str = "2"                   # "2" (paper) or "inf"; any spelling `canonical_norm` takes.
    eps: float = PAPER_EPS            # Radius in [0, 1] pixel units over H*W*C (paper: 128/255).
    steps: int = 10                   # PGD ascent steps (FGSM ignores it).
    step_size: float | None = None    # PGD step length; None -> 2.5 * eps / steps.
    random_start: bool = True         # PGD starts from a uniform point of the eps-ball.

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"AttackConfig.method must be one of {METHODS}, got {self.method!r}")
        canonical_norm(self.norm)
        _check_static(self.eps, self.steps, self.step_size)


def run_attack(apply_fn: Callable, x, y, key, config: AttackConfig, *, multilabel: bool):
    """Adversarial images [B, H, W, C] for `config` (dispatches to `fgsm` or `pgd`)."""
    if config.method == "fgsm":
        return fgsm(apply_fn, x, y, eps=config.eps, norm=config.norm, multilabel=multilabel)
    return pgd(apply_fn, x, y, key, eps=config.eps, norm=config.norm, steps=config.steps,
               step_size=config.step_size, random_start=config.random_start,
               multilabel=multilabel)


def _scores(logits, multilabel):
    """Class scores the metrics threshold/argmax: sigmoid (multi-label) or softmax [B, C]."""
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "multilabel"))
def _clean_and_adversarial_scores(apply_fn, variables, image, label, key, config, multilabel):
    """Scores before and after the attack for one batch: ([B, C], [B, C])."""
    predict = functools.partial(apply_fn, variables)
    x_adv = run_attack(predict, image, label, key, config, multilabel=multilabel)
    return _scores(predict(image), multilabel), _scores(predict(x_adv), multilabel)


def _check_batch(batch: Mapping[str, Any], index: int, multilabel: bool):
    for name in ("image", "label"):
        if name not in batch:
            raise ValueError(f"evaluate_under_attack: batch {index} has no {name!r} entry "
                             f"(keys: {sorted(batch)})")
    image, label = batch["image"], batch["label"]
    if np.ndim(image) != 4:
        raise ValueError(f"evaluate_under_attack: batch {index} 'image' must be [B, H, W, C], "
                         f"got shape {np.shape(image)}")
    want = 2 if multilabel else 1
    if np.ndim(label) != want:
        raise ValueError(f"evaluate_under_attack: batch {index} 'label' has shape "
                         f"{np.shape(label)}, expected {'[B, C]' if multilabel else '[B]'} "
                         f"for multilabel={multilabel}")
    mask = batch.get("mask")
    if mask is not None and np.shape(mask) != np.shape(label)[:1]:
        raise ValueError(f"evaluate_under_attack: batch {index} 'mask' has shape "
                         f"{np.shape(mask)}, expected {np.shape(label)[:1]} (one entry per row)")


def evaluate_under_attack(apply_fn: Callable, variables, batches: Iterable[Mapping[str, Any]],
                          config: AttackConfig, key, *, multilabel: bool):
    """Attack every evaluation batch and return scores before and after the attack.

    The attack of batch i uses `jax.random.fold_in(key, i)`.  One jitted function serves all
    batches: it compiles once when every batch has the same shape (the evaluation pipeline
    pads the last batch and marks the padding with mask 0).  `variables` is a jit argument,
    not a captured constant, so large models are not baked into the compiled program.

    Args:
      apply_fn: `apply_fn(variables, x) -> logits [B, C]` in eval mode, e.g.
        `functools.partial(model.apply, train=False)` (must be hashable; reuse one object so
        repeated calls hit the compile cache).
      variables: the model's variables, e.g. {'params': ..., 'batch_stats': ...}.
      batches: dicts with 'image' [B, H, W, C] in [0, 1], 'label' ([B] int or [B, C]
        multi-hot) and optionally 'mask' [B] (rows with mask 0 are dropped).
      config: the attack.
      key: jax.random key.
      multilabel: task flag.
    Returns:
      (y_true, scores_clean, scores_adv) numpy arrays of the unmasked rows:
      labels [N] or [N, C]; scores [N, C] = softmax (one-label) or sigmoid (multi-label)
      probabilities, ready for `rosjax.eval.metrics.classification_metrics`.
    """
    labels, clean, adv, masks = [], [], [], []
    for index, batch in enumerate(batches):
        _check_batch(batch, index, multilabel)
        scores = _clean_and_adversarial_scores(
            apply_fn, variables, batch["image"], batch["label"], jax.random.fold_in(key, index),
            config, multilabel)
        clean.append(scores[0])  # [B, C], left on device so batches dispatch back to back.
        adv.append(scores[1])
        labels.append(np.asarray(batch["label"]))
        mask = batch.get("mask")
        masks.append(np.ones(len(labels[-1]), bool) if mask is None else np.asarray(mask) != 0)
    if not labels:
        raise ValueError("evaluate_under_attack: `batches` yielded no batch")
    keep = np.concatenate(masks)  # [N_padded]
    return (np.concatenate(labels)[keep],
            np.concatenate([np.asarray(s, np.float32) for s in clean])[keep],
            np.concatenate([np.asarray(s, np.float32) for s in adv])[keep])
