"""M_smooth: equal-weight running mean of the student's weights (paper eq. 2), and BatchNorm
recalibration of the averaged weights.

Schedule (`should_average`): epochs are 0-based and a snapshot is averaged in at the *end* of
every epoch e >= warmup_epochs.  With the paper's warm-up of 10 epochs, epochs 0-9 are the
warm-up, the first snapshot is the weights after epoch 10 (the 11th epoch), and a 50-epoch run
averages 40 snapshots.

Running mean: W_s <- (n W_s + W) / (n + 1), computed as
`optax.incremental_update(W, W_s, step_size=1/(n+1))`; the first update (n=0) has step size 1 and
so copies W.  BatchNorm running statistics can be averaged the same way (`SmoothState` with
`batch_stats`, the timm-style option), but the default is to recompute them for the averaged
weights with `recalibrate_batch_stats`: those weights never ran forward during training, so no
running statistics belong to them (SWA, Izmailov et al. 2018, Sec. 3.2).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rosjax.data import device_augment


def should_average(epoch, warmup_epochs):
    """True when the weights at the end of 0-based `epoch` join the running mean."""
    if warmup_epochs < 0:
        raise ValueError(f"smoothing: warmup_epochs must be >= 0, got {warmup_epochs}")
    return epoch >= warmup_epochs


def update_running_mean(avg_params, params, n):
    """One step of the equal-weight running mean: returns ((n avg + params)/(n+1), n+1).

    When n == 0 the step size is 1 and the result is `params` itself, whatever finite values
    `avg_params` holds (it only needs the right structure).
    """
    avg = optax.incremental_update(params, avg_params, step_size=1.0 / (n + 1))
    return avg, n + 1


class SmoothState(flax.struct.PyTreeNode):
    """Running mean of the student's weights (a pytree, so it checkpoints with the train state).

    params: averaged params; batch_stats: averaged BatchNorm statistics, or None when they are
    recomputed instead; count: number of snapshots averaged so far (int32 scalar).
    """
    params: dict
    batch_stats: dict | None
    count: jax.Array

    @classmethod
    def create(cls, params, batch_stats=None, *, average_batch_stats=False):
        """Empty running mean shaped like `params` (and `batch_stats` if they are averaged)."""
        if average_batch_stats and batch_stats is None:
            raise ValueError("smoothing: average_batch_stats=True needs the model's batch_stats")
        def copy(tree):
            return jax.tree.map(jnp.array, tree)
        return cls(params=copy(params),
                   batch_stats=copy(batch_stats) if average_batch_stats else None,
                   count=jnp.zeros((), jnp.int32))

    def update(self, params, batch_stats=None):
        """Averages in one snapshot (call at the end of each epoch where `should_average`)."""
        avg_params, count = update_running_mean(self.params, params, self.count)
        avg_stats = self.batch_stats
        if avg_stats is not None:
            if batch_stats is None:
                raise ValueError("smoothing: this SmoothState averages batch_stats; pass them to update")
            avg_stats, _ = update_running_mean(avg_stats, batch_stats, self.count)
        return self.replace(params=avg_params, batch_stats=avg_stats, count=count)


def _per_batch_statistics(next_fun, args, kwargs, context):
    """Method interceptor: leaves each BatchNorm's batch mean/var (not a running mean) in its
    'batch_stats' variables.

    Flax updates ra <- m ra + (1 - m) stat; with ra set to 0 just before the call the result is
    (1 - m) stat, and dividing by (1 - m) -- the module's own momentum -- gives stat.
    """
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    if module.momentum == 1.0:
        raise ValueError(f"smoothing: BatchNorm {module.path} has momentum 1 and never updates its "
                         "statistics; cannot recalibrate it")
    for name in ("mean", "var"):
        module.put_variable("batch_stats", name,
                            jnp.zeros_like(module.get_variable("batch_stats", name)))
    out = next_fun(*args, **kwargs)
    for name in ("mean", "var"):
        module.put_variable("batch_stats", name,
                            module.get_variable("batch_stats", name) / (1.0 - module.momentum))
    return out


@functools.partial(jax.jit, static_argnames="model")
def _accumulate_batch_statistics(model, params, acc, x):
    """acc + every BatchNorm's statistics of batch x ([B, H, W, C]) under train-mode forward."""
    with nn.intercept_methods(_per_batch_statistics):
        # A fixed dropout key: dropout (MobileNetV2's classifier) acts after the last BatchNorm,
        # so it cannot change the statistics, but train mode still needs the rng stream.
        _, updates = model.apply({"params": params, "batch_stats": acc}, x, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return jax.tree.map(jnp.add, acc, updates["batch_stats"])


def recalibrate_batch_stats(model, params, batch_stats, batches: Iterable):
    """BatchNorm statistics for `params`: the equal-weight mean over `batches` of the per-batch
    mean and (biased, flax's convention) variance of every BatchNorm layer's input.

    This is torch's `swa_utils.update_bn` (momentum=None, a cumulative average over batches) in
    flax terms.  Forward passes run in train mode (batch statistics), one jit compile for all
    batches (and for later calls with the same model and shapes).  Use un-augmented training
    images of one batch size; padded rows would enter the statistics, so there is no mask.  The
    model's dropout (if any) must come after its last BatchNorm, as in the zoo's models.

    Args:
      model: the flax Module (hashable; static under jit).
      params: the (averaged) parameters.
      batch_stats: a pytree with the model's BatchNorm statistics (only its structure is used).
      batches: iterable of images [B, H, W, C] or of batch dicts with an 'image' entry (a
        shipped batch's views are rendered, `rosjax.data.device_augment`).
    Returns:
      batch_stats with the recomputed statistics.
    """
    acc = jax.tree.map(jnp.zeros_like, batch_stats)
    count = 0
    for batch in batches:
        x = device_augment.rendered(batch)["image"] if isinstance(batch, Mapping) else batch
        acc = _accumulate_batch_statistics(model, params, acc, x)
        count += 1
    if count == 0:
        raise ValueError("smoothing: recalibrate_batch_stats got no batches")
    return jax.tree.map(lambda a: a / count, acc)
