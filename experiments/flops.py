"""FLOPs of a JAX function counted from its jaxpr, and the peak FLOP/s of known accelerators.

Why not XLA's cost analysis: on GPU, convolutions become cuDNN custom calls whose cost XLA does
not know, so `compiled.cost_analysis()["flops"]` misses most of a CNN (ResNet-50's train step
showed 0.48 GFLOP/img where it is about 24.6). Counting from the jaxpr sees the same program on
every platform, before any backend rewrites it.

What is counted (the usual model-FLOPs convention, 1 multiply-add = 2 FLOPs):

* `conv_general_dilated`: 2 x (output elements) x (kernel taps) x (input features per group).
  Taps over a zero padding count, as in torchvision's / fvcore's GMAC figures. Taps that land on
  the zeros an `lhs_dilation` inserts (the input gradient of a strided convolution) do not: the
  dense count is divided by prod(lhs_dilation), which is exact on average over positions, so the
  input gradient of a convolution costs what its forward does.
* `dot_general`: 2 x (output elements) x (contracted size).

Everything else (BatchNorm, activations, pooling, the optimiser update) is not counted; on these
CNNs it is well under 1 % of the arithmetic. Sub-jaxprs (jit, custom_jvp/vjp, remat, cond) are
walked; a `scan` body counts `length` times; a `while_loop` body (unknown trip count) counts once;
of a `cond` (e.g. `lax.platform_dependent`, as `rosjax.models.conv` uses) the costliest branch.

A train step counted this way is the forward plus both gradients: about 3x the forward (less
the input gradient of the first convolution, which nothing needs).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax._src.interpreters import partial_eval  # dce_jaxpr: not exported by jax.extend
from jax.extend import core

# Dense (no sparsity) peak FLOP/s per device by compute dtype, matched on `device_kind`.
# Sources: NVIDIA H200 and H100 SXM datasheets (BF16 tensor core 989 TFLOP/s, TF32 tensor core
# 494 TFLOP/s, FP32 67 TFLOP/s, all dense), NVIDIA A100 datasheet (BF16 312, TF32 156, FP32
# 19.5). The float32 entries are the TF32 peaks: at JAX's default precision XLA runs float32
# convolutions and matmuls on TF32 tensor cores (rosjax's fp32 train steps on an H200 reach
# 1.2-1.9x the 67 TFLOP/s FP32 peak, which only TF32 allows). CPUs are absent: their peak
# depends on core count, clock and vector width, which JAX does not report, so no utilisation
# is given for them.
PEAK_FLOP_PER_S = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def peak_flop_per_s(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device of kind `device_kind` in `dtype`, None when unknown."""
    for name, peaks in PEAK_FLOP_PER_S.items():
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    taps = math.prod(rhs[d] for d in rhs_spec[2:])
    macs = math.prod(out) * taps * rhs[rhs_spec[1]]
    return 2 * macs / math.prod(eqn.params["lhs_dilation"])


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value) -> list:
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: core.Jaxpr) -> float:
    """FLOPs of convolutions and matmuls in `jaxpr`, sub-jaxprs included (see the module doc)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":  # one branch runs: the most expensive one bounds it
            total += max(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params["branches"]))
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """FLOPs of one call `fn(*args, **kwargs)`; args may be arrays or jax.ShapeDtypeStruct.

    Dead code is removed first (JAX's own `dce_jaxpr`, which XLA's dead-code elimination
    matches): e.g. the input gradient a custom VJP computes for pixels nobody differentiates.
    A jitted `fn` over a sharded batch is counted over the whole (global) batch.
    """
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    live, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return jaxpr_flops(live)
