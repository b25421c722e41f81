"""A tiny CNN student and a distillation batch, for the tests of the distillation step's outputs.

`tiny_student(k, b, c, rng)`: a fresh tiny_cnn TrainState on one device (8x8 RGB inputs, `c`
classes, SGD lr 0.05) and a batch of `b` random images with integer labels and the logits
[k, b, c] of `k` teachers, all drawn from the numpy Generator `rng`.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rosjax.config import OptimConfig
from rosjax.models import create
from rosjax.train import optim, parallel
from rosjax.train.state import TrainState, create_train_state


def tiny_student(k: int, b: int, c: int, rng: np.random.Generator) -> tuple[TrainState, dict[str, jax.Array]]:
    batch = {"image": jnp.asarray(rng.random((b, 8, 8, 3), dtype=np.float32)),     # [B, 8, 8, 3]
             "label": jnp.asarray(rng.integers(0, c, b).astype(np.int32)),          # [B]
             "teacher_logits": jnp.asarray(rng.normal(size=(k, b, c)).astype(np.float32))}  # [K, B, C]
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=0.05), steps_per_epoch=10)
    state = create_train_state(create("tiny_cnn", c), tx, jax.random.key(0), (1, 8, 8, 3), mesh)
    return state, batch
