"""2-D NHWC convolution that is also fast on XLA:CPU, the same arithmetic everywhere.

XLA:CPU has two slow spots that a CNN's train step hits on every layer (measured on a 2-core
x86 machine, batch 32, fp32; see the README's "CPU performance"):

* the kernel gradient of a convolution, a convolution whose "kernel" is the whole output
  gradient: a stride-1 3x3 layer at 32x32x64 takes about 10x its forward pass, a 7x7 stem
  on 3 channels about 7x;
* grouped convolutions (`feature_group_count`, MobileNet-V2's depthwise 3x3 layers), lowered
  as dense ones: the forward pass of a 384-channel depthwise layer costs ~140x its FLOPs' worth.

On CPU this module therefore computes (a) the kernel gradient as one matmul per kernel tap,
dW[i, j] = sum over (b, y, x) of x_pad[b, s*y + i, s*x + j, :]^T g[b, y, x, :] (im2col, one
matmul, for thin inputs), and (b) a
depthwise convolution as a sum over taps of shifted, strided slices times the tap's weights.
Both are the convolution's own sums in another order: results differ from XLA's convolution by
float rounding only. Other platforms (cuDNN on GPU) keep `lax.conv_general_dilated`; the choice
is made when the program is lowered (`lax.platform_dependent`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = Sequence[tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, strides, padding, groups):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMENSIONS,
                                    feature_group_count=groups)


def _taps(x_pad: jax.Array, kernel_hw: tuple[int, int], strides, out_hw):
    """Yields (i, j, slice [B, Ho, Wo, C] of x_pad that kernel tap (i, j) multiplies)."""
    (sh, sw), (ho, wo) = strides, out_hw
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            yield i, j, x_pad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]


def _pad(x, padding):
    return jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))


def _depthwise_by_taps(x, w, strides, padding, out_hw):
    """Depthwise conv: x [B, H, W, C], w [kh, kw, 1, C] -> [B, Ho, Wo, C], accumulated in
    float32 (as XLA's convolutions accumulate) and returned in x's dtype."""
    out = None
    for i, j, tap in _taps(_pad(x, padding), w.shape[:2], strides, out_hw):
        term = tap.astype(jnp.float32) * w[i, j, 0].astype(jnp.float32)
        out = term if out is None else out + term
    return out.astype(x.dtype)


_IM2COL_MAX_DEPTH = 256  # kh*kw*Ci up to which the taps are concatenated into one matmul
# Output area (Ho*Wo) from which a dense conv's kernel gradient is computed by matmuls. The
# matmuls pay where the feature maps are large (at 32x32 a 3x3 layer's gradients ran 3x faster),
# but they are more program to compile (ResNet-18's train step: 13 s against 9 s), and on small
# maps, such as the 32-px crops of smoke runs and tests, XLA's convolution is as fast.
_MATMUL_GRAD_MIN_AREA = 32 * 32


def _kernel_grad_by_matmuls(x, g, w_shape, strides, padding):
    """dL/dW [kh, kw, Ci, Co] of a dense conv from its input x [B, H, W, Ci] and output
    gradient g [B, Ho, Wo, Co], in float32: one [Ci, B*Ho*Wo] x [B*Ho*Wo, Co] matmul per tap,
    or, for thin inputs (a stem: 7*7*3 = 147), the taps concatenated into one matmul of depth
    kh*kw*Ci (im2col; 1.9x faster there, its memory is kh*kw times the input's)."""
    taps = [tap for _, _, tap in _taps(_pad(x, padding), w_shape[:2], strides, g.shape[1:3])]
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
    if len(taps) * w_shape[2] <= _IM2COL_MAX_DEPTH:
        grad = lax.dot_general(jnp.concatenate(taps, axis=-1), g, contract,
                               preferred_element_type=jnp.float32)  # [kh*kw*Ci, Co]
        return grad.reshape(w_shape)
    grads = [lax.dot_general(tap, g, contract, preferred_element_type=jnp.float32)  # [Ci, Co]
             for tap in taps]
    return jnp.stack(grads).reshape(w_shape)  # [kh, kw, Ci, Co]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_conv(x, w, strides, padding):
    return _xla_conv(x, w, strides, padding, 1)


def _dense_conv_fwd(x, w, strides, padding):
    return _xla_conv(x, w, strides, padding, 1), (x, w)


def _dense_conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    # The transpose of the convolution in x: no forward pass, unlike jax.vjp.
    (dx,) = jax.linear_transpose(lambda x_: _xla_conv(x_, w, strides, padding, 1), x)(g)
    return dx, _kernel_grad_by_matmuls(x, g, w.shape, strides, padding).astype(w.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, *, strides: tuple[int, int], padding: Padding,
           groups: int = 1) -> jax.Array:
    """`lax.conv_general_dilated(x, w, strides, padding, ('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups)`, with the CPU formulations above when lowered for CPU.

    x: [B, H, W, Ci]; w: [kh, kw, Ci / groups, Co]; padding: ((top, bottom), (left, right)).
    Returns [B, Ho, Wo, Co]. Groups other than 1 and depthwise (groups = Ci = Co), and dense
    convolutions with outputs smaller than `_MATMUL_GRAD_MIN_AREA`, use XLA's convolution on
    every platform.
    """
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    xla = functools.partial(_xla_conv, strides=strides, padding=padding, groups=groups)
    out_hw = jax.eval_shape(xla, x, w).shape[1:3]
    if groups == 1 and out_hw[0] * out_hw[1] < _MATMUL_GRAD_MIN_AREA:
        return xla(x, w)
    if groups == 1:
        def cpu(x, w):
            return _dense_conv(x, w, strides, padding)
    elif groups == x.shape[-1] == w.shape[-1] and w.shape[2] == 1:
        cpu = functools.partial(_depthwise_by_taps, strides=strides, padding=padding,
                                out_hw=out_hw)
    else:
        return xla(x, w)
    return lax.platform_dependent(x, w, cpu=cpu, default=xla)


class Conv(nn.Module):
    """A bias-free square convolution with symmetric zero padding, computed by `conv2d`.

    The variables are those of `nn.Conv(features, (k, k), use_bias=False,
    feature_group_count=groups, param_dtype=float32)`: one float32 'kernel'
    [k, k, C_in / groups, features], so checkpoints and torchvision weight loading see the
    same tree. Input and kernel are cast to `dtype` (the compute dtype), as nn.Conv does.
    Call: x [B, H, W, C_in] -> [B, H', W', features].
    """
    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    groups: int = 1
    dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p, s = self.kernel_size, self.padding, self.strides
        kernel = self.param("kernel", self.kernel_init,
                            (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides=(s, s),
                      padding=((p, p), (p, p)), groups=self.groups)
