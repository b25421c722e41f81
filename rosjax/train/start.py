"""The beginning every trainer shares (teacher, student, RL student): one function, `start_run`.

It places the mesh, refuses a batch that does not split over the devices, builds the paper's
optimiser and learning-rate schedule, splits the seed into the initialisation key and the run
key (the one `loop.fit` folds the step into), and initialises the state on the mesh. Trained
models are exported under `<workdir>/FINAL_DIR`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import optax

from rosjax.config import OptimConfig
from rosjax.train import optim, parallel
from rosjax.train.state import TrainState, create_train_state

FINAL_DIR = "final"  # <workdir>/final/: the exported variables of a finished run


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What `start_run` returns."""
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule      # the learning rate per update, for the epoch log
    state: TrainState             # freshly initialised, replicated on the mesh
    init_key: jax.Array           # the key `state` was initialised from (other initialisers fold it in)
    run_key: jax.Array            # the key of every per-step draw (dropout, teacher weights)


def start_run(model: nn.Module, *, optim_cfg: OptimConfig, steps_per_epoch: int,
              image_shape: tuple[int, int, int], seed: int, mesh: jax.sharding.Mesh | None = None,
              load_weights: Callable[[dict], dict] | None = None) -> RunStart:
    """Mesh, batch check, optimiser, keys and initial state of a training run of `model`.

    image_shape: (H, W, C) of one input image.
    load_weights: maps the freshly initialised {'params', 'batch_stats'} to the starting ones, e.g.
      ImageNet weights (`rosjax.models.pretrained.load_torchvision_weights`); the optimiser state
      (momentum buffers) starts at zero either way. A resumed run restores its checkpoint instead.
    """
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(optim_cfg.batch_size, mesh)
    tx, schedule = optim.make_optimizer(optim_cfg, steps_per_epoch)
    init_key, run_key = jax.random.split(jax.random.key(seed))
    state = create_train_state(model, tx, init_key, (1, *image_shape), mesh)
    if load_weights is not None:
        loaded = jax.device_put(load_weights(jax.device_get(state.variables)), parallel.replicated(mesh))
        state = state.replace(params=loaded["params"], batch_stats=loaded["batch_stats"])
    return RunStart(mesh=mesh, tx=tx, schedule=schedule, state=state, init_key=init_key, run_key=run_key)
