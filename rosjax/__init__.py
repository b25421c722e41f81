"""rosjax: Robust Stochastic Knowledge Distillation (RoS-KD) in JAX/Flax.

Subpackages: `models` (the Flax model zoo), `data` (TFDS builders, splits, grain pipeline),
`train` (state, pure steps, data-parallel loop), `distill` (KD losses, teacher weighting,
weight smoothing), `eval` (metrics, attacks, loss landscapes, reports); `checkpoint` is the
one module that talks to Orbax.
"""

__version__ = "0.1.0"
