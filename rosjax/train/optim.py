"""The paper's optimiser: PyTorch-style SGD with momentum, coupled weight decay, step decay.

PyTorch's `torch.optim.SGD(lr, momentum=m, weight_decay=wd)` (dampening 0, no Nesterov) does

    g <- g + wd * p          # weight decay added to the gradient ("coupled", L2)
    b <- m * b + g           # momentum buffer; b = g on the first step
    p <- p - lr * b

`optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m))` is the same
computation: `optax.trace` starts from a zero buffer, so its first step also gives b = g, and
the learning rate multiplies the buffer (not the gradient), as in PyTorch.

The learning rate follows `torch.optim.lr_scheduler.MultiStepLR` stepped once per epoch: it is
multiplied by `decay_factor` from the first step of each milestone epoch on (0-based epochs:
with milestones (25, 40), epochs 0-24 use 0.1, 25-39 use 0.01, 40-49 use 0.001).

Weight decay applies to every parameter, BatchNorm scales/biases and biases included, as
PyTorch's default does; `decay_all_params=False` restricts it to kernels (arrays of rank > 1).
`clip_grad_norm` > 0 first rescales the gradient to that global norm when it is larger
(`torch.nn.utils.clip_grad_norm_` before `optimizer.step()`); the paper does not clip.
The hyper-parameters live in `rosjax.config.OptimConfig` (paper defaults, a comment per field).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rosjax.config import OptimConfig


def lr_schedule(cfg: OptimConfig, steps_per_epoch: int) -> optax.Schedule:
    """Step-decay schedule: learning rate as a function of the update count (0-based)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if any(m < 1 for m in cfg.milestones):
        raise ValueError(f"optim.milestones must be epochs >= 1, got {cfg.milestones}")
    boundaries = {}
    for milestone in sorted(cfg.milestones):
        # Repeated milestones decay repeatedly, as in MultiStepLR.
        step = milestone * steps_per_epoch
        boundaries[step] = boundaries.get(step, 1.0) * cfg.decay_factor
    return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)


def make_optimizer(cfg: OptimConfig, steps_per_epoch: int, *,
                   decay_all_params: bool = True) -> tuple[PaperSGD, optax.Schedule]:
    """Returns (tx, schedule) for `cfg` (see the module docstring for the exact update)."""
    schedule = lr_schedule(cfg, steps_per_epoch)  # also checks the arguments
    return PaperSGD(cfg, decay_all_params, steps_per_epoch), schedule


@dataclasses.dataclass(frozen=True)
class PaperSGD:
    """The optimiser of `make_optimizer`: an optax (init, update) pair that compares by value.

    The train state holds its optimiser as a static field, which jit compares when it looks a
    compiled step up; an optax chain's functions compare by identity, so with one every run
    would trace its steps again. Equal recipes compare equal here whatever their epoch length:
    only `init` reads it (it becomes an array of the optimiser state, `StepDecayState`), never
    the compiled update, so the teachers of every subset size share one train step program.
    """
    cfg: OptimConfig
    decay_all_params: bool = True
    steps_per_epoch: int = dataclasses.field(default=1, compare=False)

    def _chain(self, steps_per_epoch) -> optax.GradientTransformation:
        mask = None if self.decay_all_params else (lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
        clip = (optax.clip_by_global_norm(self.cfg.clip_grad_norm),) if self.cfg.clip_grad_norm > 0 else ()
        return optax.chain(*clip, optax.add_decayed_weights(self.cfg.weight_decay, mask=mask),
                           optax.trace(decay=self.cfg.momentum, nesterov=self.cfg.nesterov),
                           scale_by_step_decay(self.cfg, steps_per_epoch))

    def init(self, params) -> optax.OptState:
        return self.init_with_epoch_length(params, self.steps_per_epoch)

    def init_with_epoch_length(self, params, steps_per_epoch) -> optax.OptState:
        """`init` for an epoch length given as an int or an int32 array (a jitted init's argument)."""
        return self._chain(steps_per_epoch).init(params)

    def update(self, updates, state, params=None):
        return self._chain(self.steps_per_epoch).update(updates, state, params)


class StepDecayState(NamedTuple):
    """Update count and epoch length of `scale_by_step_decay`: both arrays of the state."""
    count: jax.Array            # int32 [] updates applied so far
    steps_per_epoch: jax.Array  # int32 []


def scale_by_step_decay(cfg: OptimConfig, steps_per_epoch) -> optax.GradientTransformation:
    """Multiplies updates by -lr, lr = `lr_schedule(cfg, steps_per_epoch)(count)`, bit for bit.

    The epoch length lives in the optimiser state rather than in the compiled program, so
    teachers on subsets of different sizes (the overlap sweep, the folds) share one compiled
    train step per architecture instead of compiling one per subset size; `steps_per_epoch`
    (checked by `make_optimizer`) may be an int32 array. The arithmetic is
    optax.piecewise_constant_schedule's: the initial rate times each passed milestone's factor.
    """
    milestones = sorted(cfg.milestones)

    def init(params):
        del params
        return StepDecayState(count=jnp.zeros([], jnp.int32), steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32))

    def update(updates, state, params=None):
        del params
        epoch = state.count // state.steps_per_epoch
        lr = jnp.array(cfg.learning_rate, jnp.float32)
        for milestone in milestones:
            lr = lr * jnp.where(epoch < milestone, 1.0, cfg.decay_factor)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, StepDecayState(count=optax.safe_int32_increment(state.count),
                                       steps_per_epoch=state.steps_per_epoch)

    return optax.GradientTransformation(init, update)
