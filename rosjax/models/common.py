"""Building blocks shared by the model zoo: torchvision-style layers and input handling.

Every model builds its layers through these factories so that all of them share the
torchvision conventions: bias-free convolutions with explicit (torch) paddings, BatchNorm with
epsilon 1e-5 and momentum 0.9 (torch's momentum 0.1), float32 parameters whatever the compute
dtype, and PyTorch's default `nn.Linear` initialisation for classifier heads.
"""
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rosjax.models.conv import Conv


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Flax kernel: HWIO for convolutions, [in, out] for dense layers.

    torch computes the same numbers from its OIHW / [out, in] layouts (a depthwise kernel
    [kh, kw, 1, C] has fan_in kh*kw and fan_out C*kh*kw in both).
    """
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _flat_draw(sample: Callable[[jax.Array, tuple[int], Any], jax.Array]) -> Callable[..., jax.Array]:
    """Draws a kernel as one flat vector and reshapes it.

    Same distribution; the reason is compile time: with `jax_threefry_partitionable` (JAX's
    default) XLA:CPU compiles a 4-D random draw about 10x slower than a 1-D one, and a
    DenseNet-121 init holds 120 of them.
    """
    def init(key, shape, dtype=jnp.float32):
        return sample(key, (math.prod(shape),), dtype).reshape(shape)
    return init


def kaiming_normal(mode: str) -> Callable[..., jax.Array]:
    """torch.nn.init.kaiming_normal_(w, mode=mode, nonlinearity='relu'): N(0, 2 / fan), untruncated."""
    def init(key, shape, dtype=jnp.float32):
        fan = _fans(shape)[0 if mode == "fan_in" else 1]
        return _flat_draw(jax.random.normal)(key, shape, dtype) * math.sqrt(2.0 / fan)
    return init


def _torch_linear_kernel(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default weight init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(_fans(shape)[0])
    return _flat_draw(jax.random.uniform)(key, shape, dtype) * (2 * bound) - bound


# torchvision's ResNet and MobileNetV2 convolutions: kaiming_normal_(mode='fan_out').
KAIMING_NORMAL_FAN_OUT = kaiming_normal("fan_out")
# torchvision's DenseNet convolutions: kaiming_normal_ with its defaults (mode='fan_in').
KAIMING_NORMAL_FAN_IN = kaiming_normal("fan_in")
TORCH_LINEAR_KERNEL = _torch_linear_kernel


def torch_linear_bias(fan_in: int) -> Callable[..., jax.Array]:
    """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scaled_channels(channels: int, width: float) -> int:
    """`channels` times the width multiplier, rounded as torchvision's `_make_divisible(v, 8)`.

    The nearest multiple of 8, at least 8, and never more than 10 % below `channels * width`;
    width 1.0 returns `channels` for every channel count of the zoo.
    """
    target = channels * width
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
         dtype: Any, kernel_init=KAIMING_NORMAL_FAN_OUT, name: str) -> Conv:
    """A bias-free square convolution with torch's symmetric zero padding `padding`
    (`rosjax.models.conv.Conv`: nn.Conv's variables, fast gradients on XLA:CPU too)."""
    return Conv(features, kernel, strides=stride, padding=padding, groups=groups, dtype=dtype,
                kernel_init=kernel_init, name=name)


def batch_norm(*, train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """torch.nn.BatchNorm2d's defaults: scale 1, bias 0, eps 1e-5, running-average momentum 0.1.

    Statistics are reduced and stored in float32 (flax's `force_float32_reductions`), and the
    variance is computed in two passes (`use_fast_variance=False`) as torch does, which stays
    accurate when activations have a large mean. No `axis_name`: under `jax.jit` the module
    sees the global batch, so the statistics are already synchronised across devices. Unlike
    torch, the running variance is updated with the biased batch variance (flax's rule); the
    difference is a factor n/(n-1) with n = batch x height x width.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)


def torch_dense(features: int, fan_in: int, *, dtype: Any, name: str) -> nn.Dense:
    """A classifier layer initialised like torch.nn.Linear's default."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=TORCH_LINEAR_KERNEL, bias_init=torch_linear_bias(fan_in),
                    name=name)


# torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1); the padding acts as -inf.
max_pool_3x3_s2 = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                    padding=((1, 1), (1, 1)))


def normalize_pixels(x: jax.Array, mean: Sequence[float] | None,
                     std: Sequence[float] | None, dtype: Any) -> jax.Array:
    """`(x - mean) / std` over the channel axis of NHWC pixels in [0, 1], then cast to `dtype`.

    `mean` and `std` hold one value per channel, or one value for all channels; None means 0
    and 1. A length that is neither 1 nor the channel count is an error rather than a silent
    broadcast (3 statistics against a 1-channel X-ray would turn it into 3 channels).
    """
    channels = x.shape[-1]
    for label, stats in (("pixel_mean", mean), ("pixel_std", std)):
        if stats is not None and len(stats) not in (1, channels):
            raise ValueError(f"{label} has {len(stats)} values but the input has {channels} "
                             f"channels; give 1 value or {channels}.")
    x = jnp.asarray(x, jnp.float32)  # [B, H, W, C]
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """torch's adaptive_avg_pool2d(x, 1) + flatten: [B, H, W, D] -> [B, D]."""
    return jnp.mean(x, axis=(1, 2))


def head_outputs(logits: jax.Array, features: jax.Array, return_features: bool):
    """The models' common return: float32 logits [B, K], optionally with features [B, D]."""
    logits = logits.astype(jnp.float32)
    if return_features:
        return logits, features.astype(jnp.float32)
    return logits
