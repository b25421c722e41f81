"""The train state: plain data (a pytree) plus the model's apply function and the optimiser.

`step` counts optimiser updates; the step's randomness is `fold_in(run_key, step)`, so the state
carries no RNG and a resumed run draws the same keys at the same steps.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rosjax.train import optim, parallel


class TrainState(flax.struct.PyTreeNode):
    """step, params, batch_stats, opt_state; `apply_fn` and `tx` are static (not pytree leaves)."""
    step: jax.Array          # [] int32, number of optimiser updates applied
    params: Any              # model parameters
    batch_stats: Any         # BatchNorm running statistics ({} for a model without BatchNorm)
    opt_state: Any           # optax state of `tx`
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optim.PaperSGD = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, Any]:
        """{'params', 'batch_stats'}: what `module.apply` and `save_variables` take."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def model_state(self) -> ModelState:
        """The model alone, without the optimiser state (half of a TrainState's bytes)."""
        return ModelState(params=self.params, batch_stats=self.batch_stats, apply_fn=self.apply_fn)


class ModelState(flax.struct.PyTreeNode):
    """A finished model to run in inference mode: params, batch_stats and the static `apply_fn`.

    What the evaluation passes (`steps.eval_step`, `rosjax.train.validation`) read of a state,
    without an optimiser; a `TrainState` serves them the same way.
    """
    params: Any              # model parameters
    batch_stats: Any         # BatchNorm running statistics ({} for a model without BatchNorm)
    apply_fn: Callable = flax.struct.field(pytree_node=False)

    @classmethod
    def of(cls, model: nn.Module, variables: dict[str, Any]) -> ModelState:
        """The state of `model` with `variables` ({'params'} and, with BatchNorm, {'batch_stats'})."""
        return cls(params=variables["params"], batch_stats=variables.get("batch_stats", {}), apply_fn=model.apply)

    @property
    def variables(self) -> dict[str, Any]:
        """{'params', 'batch_stats'}: what `module.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(model: nn.Module, tx: optim.PaperSGD, key: jax.Array,
                       sample_shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> TrainState:
    """Initialises the model and optimiser directly on the mesh's devices, replicated.

    Shapes first (`jax.eval_shape`, no computation), then shardings, then jitted inits with
    `out_shardings`, so the arrays are born on the devices with their final sharding. The model
    and the optimiser are initialised by two programs: the model's (its random initialisers,
    seconds to compile on a CPU) depends only on the architecture and the input shape, so every
    run of one architecture shares it, while the optimiser's (zeros, and the epoch length of
    `optim.scale_by_step_decay`, an argument) is tiny and shared by every run of one recipe.

    Args:
      model: a linen module with `init(key, x, train=False)`.
      tx: the optimiser (`optim.make_optimizer`).
      key: init key (parameters and, if the model draws any, dropout).
      sample_shape: shape of one input batch, e.g. (1, 32, 32, 3) (NHWC, float32).
      mesh: the data-parallel mesh (`parallel.make_mesh()`).
    """
    try:
        init = _jitted_model_init(model, tuple(sample_shape), mesh)
    except TypeError:  # a module with an unhashable field (e.g. a list): traced for this run alone
        init = _jitted_model_init.__wrapped__(model, tuple(sample_shape), mesh)
    variables = init(key)
    params = variables["params"]
    opt_state = _jitted_optimizer_init(tx, mesh)(params, jnp.asarray(tx.steps_per_epoch, jnp.int32))
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh)), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=opt_state, apply_fn=model.apply, tx=tx)


@functools.lru_cache(maxsize=32)
def _jitted_model_init(model: nn.Module, sample_shape: tuple[int, ...],
                       mesh: jax.sharding.Mesh) -> Callable[[jax.Array], dict[str, Any]]:
    """The jitted `model.init` of one architecture, input shape and mesh, built once per process.

    Linen modules compare equal by their fields, so every run of an architecture (the teachers of
    each sweep point, the students of each setting) reuses one traced program instead of tracing
    the initialisers again (a second or two each on a CPU, even with the compile cached). The
    variables' shapes do not depend on the key, so a typed key stands in for the caller's.
    """

    def init_variables(key):
        return model.init({"params": key, "dropout": key}, jnp.zeros(sample_shape, jnp.float32), train=False)

    shapes = jax.eval_shape(init_variables, jax.random.key(0))
    return jax.jit(init_variables, out_shardings=_replicated_like(shapes, mesh))


@functools.lru_cache(maxsize=32)
def _jitted_optimizer_init(tx, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted `tx.init_with_epoch_length(params, steps_per_epoch)`, replicated on `mesh`, once
    per recipe (`optim.PaperSGD` compares by value) and mesh: each architecture's parameter tree
    is traced and compiled once, whatever the epoch length."""
    return jax.jit(tx.init_with_epoch_length, out_shardings=parallel.replicated(mesh))


def _replicated_like(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """A replicated sharding on `mesh` for every leaf of `tree` (jit's out_shardings)."""
    return jax.tree.map(lambda _: parallel.replicated(mesh), tree)

