"""Training engine: train state, pure steps, data parallelism, the epoch loop, the optimiser.

Modules: `state` (TrainState, create_train_state), `steps` (train_step, eval_step and their
reusable pieces), `parallel` (mesh, shardings, jitted steps, multi-host start), `optim` (the
paper's SGD recipe), `loop` (fit: epochs, checkpoints, resume, logging), `evaluate`
(validation passes and metrics), `classifier` (train_classifier for teachers and baselines).
"""
from rosjax.train.state import TrainState, create_train_state
from rosjax.train.steps import accuracy, apply_gradients, eval_step, forward_train, step_rng, train_step

__all__ = ["TrainState", "create_train_state", "accuracy", "apply_gradients", "eval_step",
           "forward_train", "step_rng", "train_step"]
