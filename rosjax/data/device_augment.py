"""Training and evaluation views rendered on the accelerator, batched, inside the jitted step.

The host ships the stored pixels, uint8 [B, H, W, C] (an image smaller than the batch's
stored shape sits in the top-left corner, zero-padded; its own size is `AugmentParams.size`),
and one drawn view per example as `AugmentParams` (crop box, flips, angle, colour-jitter
factors; `rosjax.data.pipeline` draws them from `default_rng([seed, epoch, row])` exactly as
its host path does). The steps call `render(batch)` first, which replaces the uint8 image by
float32 [B, S, S, C] in [0, 1]; a batch without a 'view' passes through unchanged.

`render_images` reproduces the host reference `rosjax.data.views.apply_view` (PIL) step for step,
because a view must look the same wherever it is rendered (host fallback, cached teacher
outputs, evaluation):

1. crop + resize: PIL's BILINEAR resize of a box is a separable triangle filter whose support
   widens with the downscale factor (antialiasing), a horizontal pass then a vertical pass,
   each rounded to uint8. Here each pass is a per-example weight matrix ([S, W], [S, H]) built
   with PIL's formula and applied as a batched matmul, then rounded the same way.
2. flips: the weight matrix read backwards (a mirrored output is the same resample reversed).
3. rotation: PIL's rotate: each output pixel centre is mapped back about the image centre,
   read bilinearly with clamped neighbours, black where it falls outside, truncated to uint8.
4. colour jitter: brightness, contrast (blend with the image's mean grey), saturation (blend
   with the pixel's grey), each clipped to [0, 1]; a NaN factor is not applied.

Two resamplings, not one composed affine map, because that is what PIL (and so the host
path) does; a single map would skip the antialiasing and the intermediate rounding and
differ from the host by several grey levels. The remaining differences are float32 versus
PIL's fixed-point/float64 arithmetic: a rounding that lands on the other side (1/255), and,
on the rotation's black border, a sample point within ~1e-5 px of the image edge
(tests/test_device_augment.py states and checks the tolerance).

Matmuls run at `Precision.HIGHEST`: a TF32 or bf16 matmul on a GPU would move pixels by
~1/255 everywhere.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as PIL's convert('L')
_HIGHEST = jax.lax.Precision.HIGHEST
VIEW_KEY = "view"  # the batch entry holding the AugmentParams


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["box", "flips", "angle", "jitter", "size"],
                   meta_fields=["image_size"])
@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One drawn view per example, as arrays with the batch axis first (numpy on the host,
    jax arrays in the step). A pytree: `parallel.shard_batch` splits every field on 'data'.

    Attributes:
      box: float32 [B, 4] crop (left, top, right, bottom) in source pixels, resized to S x S.
      flips: bool [B, 2] mirror left-right, top-bottom.
      angle: float32 [B] rotation in degrees, counter-clockwise (0: none).
      jitter: float32 [B, 3] brightness, contrast, saturation factors (NaN: not applied).
      size: int32 [B, 2] the image's own height and width inside the padded [H, W].
      image_size: S, the output side (static: part of the compiled program's signature).
    """
    box: Any
    flips: Any
    angle: Any
    jitter: Any
    size: Any
    image_size: int


def _taps(start: jax.Array, end: jax.Array, valid: jax.Array, in_size: int, out_size: int,
          flip: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PIL's BILINEAR resample taps of one axis: (source index int32 [B, S, K], weight [B, S, K]).

    start, end: [B] box edges; valid: [B] the image's own length (no weight beyond it);
    flip: [B] bool, the output read backwards. Output pixel j samples the centre
    c = start + (j + 0.5) * scale with a triangle of half-width f = max(scale, 1), normalised
    to sum 1 (Pillow's precompute_coeffs). Its nonzero taps lie in (c - f - 0.5, c + f - 0.5),
    so K = 2 * ceil(in_size / out_size) + 2 taps from floor(c - f - 0.5) hold them all (the
    host checks that the box lies inside the image).
    """
    taps = 2 * math.ceil(max(in_size / out_size, 1.0)) + 2
    scale = (end - start) / out_size                                   # [B]
    filterscale = jnp.maximum(scale, 1.0)[:, None, None]
    centre = start[:, None] + (jnp.arange(out_size) + 0.5) * scale[:, None]  # [B, S]
    centre = jnp.where(flip[:, None], centre[:, ::-1], centre)[:, :, None]   # [B, S, 1]
    index = jnp.floor(centre - filterscale - 0.5) + jnp.arange(taps)   # [B, S, K]
    w = jnp.maximum(0.0, 1.0 - jnp.abs((index + 0.5 - centre) * (1.0 / filterscale)))
    w = jnp.where((index >= 0) & (index < valid[:, None, None]), w, 0.0)
    return jnp.clip(index, 0, in_size - 1).astype(jnp.int32), w / jnp.sum(w, -1, keepdims=True)


def _round_u8(x: jax.Array) -> jax.Array:
    """Round half up and clip to 0..255, as Pillow stores a resampled 8-bit value."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _resize(images: jax.Array, params: AugmentParams) -> jax.Array:
    """Crop box -> S x S, flips included: uint8 [B, H, W, C] -> float32 grey levels [B, S, S, C].

    A tap gather and a K-term sum per pass (the filter is banded: K << W), horizontal first.
    """
    _, height, width, _ = images.shape
    s = params.image_size
    box = params.box.astype(jnp.float32)
    size = params.size.astype(jnp.int32)
    ix, wx = _taps(box[:, 0], box[:, 2], size[:, 1], width, s, params.flips[:, 0])
    iy, wy = _taps(box[:, 1], box[:, 3], size[:, 0], height, s, params.flips[:, 1])

    def one(image, ix, wx, iy, wy):  # [H, W, C], [S, K] x 4 -> [S, S, C]
        rows = jnp.einsum("hskc,sk->hsc", image.astype(jnp.float32)[:, ix], wx, precision=_HIGHEST)
        rows = _round_u8(rows)                                         # [H, S, C]
        return _round_u8(jnp.einsum("ikjc,ik->ijc", rows[iy], wy, precision=_HIGHEST))

    return jax.vmap(one)(images, ix, wx, iy, wy)


def _rotate(x: jax.Array, angle: jax.Array) -> jax.Array:
    """PIL's rotate(angle, BILINEAR) of [B, S, S, C] grey levels about the centre, black corners."""
    _, s, _, _ = x.shape
    theta = -jnp.deg2rad(angle.astype(jnp.float32))                    # [B]
    cos, sin = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
    c = s / 2
    u = (jnp.arange(s) + 0.5 - c)[None, None, :]                       # output x - centre
    v = (jnp.arange(s) + 0.5 - c)[None, :, None]                       # output y - centre
    xin = c + (cos * u + sin * v)                                      # [B, S, S] source x
    yin = c + (cos * v - sin * u)
    inside = (xin >= 0) & (xin < s) & (yin >= 0) & (yin < s)
    x0, y0 = jnp.floor(xin - 0.5), jnp.floor(yin - 0.5)
    dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]
    clamp = lambda i: jnp.clip(i, 0, s - 1).astype(jnp.int32)  # noqa: E731
    xa, xb, ya, yb = clamp(x0), clamp(x0 + 1), clamp(y0), clamp(y0 + 1)
    read = jax.vmap(lambda image, yy, xx: image[yy, xx])               # [B, S, S, C]
    top = read(x, ya, xa) + (read(x, ya, xb) - read(x, ya, xa)) * dx
    bottom = read(x, yb, xa) + (read(x, yb, xb) - read(x, yb, xa)) * dx
    value = jnp.trunc(top + (bottom - top) * dy)
    return jnp.where(inside[..., None], value, 0.0)


def _grey(x: jax.Array) -> jax.Array:
    """[B, S, S, C] -> [B, S, S] grey level (the channel itself for one channel)."""
    if x.shape[-1] == 1:
        return x[..., 0]
    return jnp.einsum("bhwc,c->bhw", x, jnp.asarray(LUMA, jnp.float32), precision=_HIGHEST)


def _colour_jitter(x: jax.Array, jitter: jax.Array) -> jax.Array:
    """Brightness, contrast, saturation on [B, S, S, C] in [0, 1]; NaN factors skip a step."""
    brightness, contrast, saturation = (jitter[:, i, None, None, None] for i in range(3))
    x = jnp.where(jnp.isnan(brightness), x, jnp.clip(x * brightness, 0.0, 1.0))
    mean_grey = jnp.mean(_grey(x), axis=(1, 2))[:, None, None, None]  # [B, 1, 1, 1]
    x = jnp.where(jnp.isnan(contrast), x,
                  jnp.clip(mean_grey + (x - mean_grey) * contrast, 0.0, 1.0))
    if x.shape[-1] == 3:
        grey = _grey(x)[..., None]                                     # [B, S, S, 1]
        x = jnp.where(jnp.isnan(saturation), x, jnp.clip(grey + (x - grey) * saturation, 0.0, 1.0))
    return x


def render_images(images: jax.Array, params: AugmentParams) -> jax.Array:
    """The views of a batch: uint8 [B, H, W, C] -> float32 [B, S, S, C] in [0, 1].

    Crop-resize (flips folded in), rotation, colour jitter, in the host reference's order.
    """
    if images.dtype != jnp.uint8 or images.ndim != 4:
        raise ValueError(f"render_images wants uint8 [B, H, W, C] images, got {images.dtype} "
                         f"{images.shape}")
    x = _rotate(_resize(images, params), params.angle)
    x = x * np.float32(1 / 255)
    return _colour_jitter(x, params.jitter.astype(jnp.float32))


def render(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A shipped batch -> the batch the model takes: 'image' float32 [B, S, S, C] in [0, 1].

    A batch with a 'view' (uint8 image + AugmentParams) is rendered and loses the 'view';
    any other batch (float images rendered on the host, a test's array) is returned as it is.
    Call it inside the jitted step, so the rendering fuses into the step's program.
    """
    if VIEW_KEY not in batch:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k != VIEW_KEY}
    out["image"] = render_images(batch["image"], batch[VIEW_KEY])
    return out


rendered = jax.jit(render)
"""`render` compiled on its own, for code that needs the pixels outside a step (loss landscapes,
attacks, BatchNorm recalibration): numpy or jax batch in, jax arrays out."""
