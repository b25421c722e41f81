"""Loss-landscape surfaces and plots after Li et al. 2018 (paper Figure 4).

f(a, b) = L(theta* + a * d1 + b * d2) on a grid of (a, b), with d1, d2 random Gaussian
directions that are *filter-normalised*: each filter of d is rescaled to the Frobenius norm of
the same filter of theta*, so the surface does not depend on the scale invariance that
BatchNorm gives each filter.  Conventions (tomgoldstein/loss-landscape, notes/kd_methods.md
section 5):

* Flax kernels keep the output filter on the LAST axis (Conv [kh, kw, in, out], Dense
  [in, out], depthwise Conv [kh, kw, 1, out]), so a filter's norm is taken over all axes but
  the last.
* 1-D parameters (biases, BatchNorm scale/bias) get a zero direction by default ("ignore
  biasbn"); with `ignore_bn_and_bias=False` their direction is a copy of the parameter itself,
  as in the original code.
* Only `params` move; BatchNorm running statistics stay at their trained values and the model
  is evaluated in eval mode (the caller binds them, see `dataset_loss_fn`).
* Default grid: 51 x 51 points on [-1, 1]^2.  `surface[i, j] = f(coords[j], coords[i])`: rows
  follow d2 (y), columns follow d1 (x), matching `np.meshgrid(coords, coords)`.
* Plots clamp the loss at 8.0 as Figure 4 does.
"""
from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rosjax.losses import supervised_per_example
from rosjax.progress import bar

DEFAULT_COORDS = np.linspace(-1.0, 1.0, 51)  # Li et al.: --x=-1:1:51 --y=-1:1:51.
LOSS_CLAMP = 8.0                             # Figure 4: "loss value clamped at 8.0".
_NORM_GUARD = 1e-10                          # As in net_plotter.normalize_direction.


def _rescale_filters(noise, weight):
    """Scale each output filter (last axis) of `noise` to the Frobenius norm of the weight's."""
    axes = tuple(range(weight.ndim - 1))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(weight.astype(jnp.float32)), axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(noise), axes, keepdims=True))  # [1, ..., 1, out]
    return (noise * (w_norm / (d_norm + _NORM_GUARD))).astype(weight.dtype)


@functools.partial(jax.jit, static_argnames=("ignore_bn_and_bias",))
def _direction(key, params, ignore_bn_and_bias):
    """The jitted body of `random_direction` (one compile per parameter structure)."""
    leaves, treedef = jax.tree.flatten(params)
    sizes = [w.size if w.ndim > 1 else 0 for w in leaves]
    # One flat draw for all kernels, sliced in tree order: a single generator instance compiles
    # far faster on XLA:CPU than one per (4-D) kernel shape.
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)  # [total kernel entries]
    starts = np.cumsum([0] + sizes)
    out = []
    for w, start, size in zip(leaves, starts, sizes):
        if w.ndim <= 1:
            out.append(jnp.zeros_like(w) if ignore_bn_and_bias else w)
        else:
            out.append(_rescale_filters(noise[start:start + size].reshape(w.shape), w))
    return jax.tree.unflatten(treedef, out)


def random_direction(key, params, *, ignore_bn_and_bias: bool = True):
    """A filter-normalised random direction with the structure of `params`.

    Args:
      key: jax.random key.  One flat Gaussian draw covers all kernels in tree order, so two
        models of the same architecture get the same raw draws from the same key.
      params: the model's trainable parameters, i.e. `variables['params']` (not batch_stats).
      ignore_bn_and_bias: zero the direction of 1-D tensors (biases, BatchNorm scale/bias);
        False copies those tensors into the direction instead, as Li et al.'s code does.
    Returns:
      a pytree like `params`.
    """
    if isinstance(params, Mapping) and ("batch_stats" in params or "params" in params):
        raise ValueError("random_direction: pass variables['params'], not the whole variables "
                         f"dict (top-level keys: {sorted(params)}); BatchNorm statistics must "
                         "stay fixed")
    return _direction(key, params, ignore_bn_and_bias)


def dataset_loss_fn(apply_fn: Callable, *, multilabel: bool, chunk_size: int | None = None):
    """Build `loss_fn(params, batch_stats, images, labels) -> mean supervised loss` for a landscape.

    Pass the last three as `loss_surface(..., args=(batch_stats, images, labels))`: they become
    arguments of the jitted grid evaluation rather than constants baked into it.

    Args:
      apply_fn: `apply_fn(variables, x) -> logits [B, C]` in eval mode (running BatchNorm
        statistics), e.g. `functools.partial(model.apply, train=False)`.
      multilabel: CE (False) or BCE summed over labels (True), as in training.
      chunk_size: evaluate the images in chunks of this many (bounds activation memory);
        None -> all at once.  Must divide the number of images.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"dataset_loss_fn: chunk_size must be >= 1 or None, got {chunk_size!r}")

    def loss_fn(params, batch_stats, images, labels):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats

        def chunk_losses(chunk):
            x, y = chunk
            return supervised_per_example(apply_fn(variables, x), y, multilabel=multilabel)

        n = images.shape[0]
        if chunk_size is None:
            return jnp.mean(chunk_losses((images, labels)))
        if n % chunk_size:
            raise ValueError(f"dataset_loss_fn: chunk_size={chunk_size} must divide the number "
                             f"of images ({n})")
        chunks = jax.tree.map(lambda a: a.reshape((n // chunk_size, chunk_size) + a.shape[1:]),
                              (images, labels))
        return jnp.mean(jax.lax.map(chunk_losses, chunks))  # mean of [N/c, c] losses

    return loss_fn


@functools.partial(jax.jit, static_argnames=("loss_fn", "vmap_size"))
def _losses_at(loss_fn, vmap_size, params, dir1, dir2, args, points):
    """Loss at each grid point: points [P, 2] of (a, b) -> losses [P]."""
    def at(point):
        a, b = point[0], point[1]
        moved = jax.tree.map(lambda w, u, v: w + (a * u + b * v).astype(w.dtype), params, dir1,
                             dir2)
        return jnp.asarray(loss_fn(moved, *args), jnp.float32)
    return jax.lax.map(at, points, batch_size=None if vmap_size == 1 else vmap_size)


def _check_coords(coords):
    coords = np.asarray(coords, np.float64)
    if coords.ndim != 1 or coords.size == 0 or not np.all(np.isfinite(coords)):
        raise ValueError(f"landscape: coords must be a non-empty 1-D array of finite values, got "
                         f"shape {coords.shape}")
    if np.any(np.diff(coords) <= 0):
        raise ValueError("landscape: coords must be strictly increasing")
    return coords


def loss_surface(loss_fn: Callable, params, dir1, dir2, *, coords=DEFAULT_COORDS, args=(),
                 chunk_size: int | None = None, vmap_size: int = 1):
    """Evaluate f(a, b) = loss_fn(params + a * dir1 + b * dir2, *args) on coords x coords.

    The grid is evaluated by ONE jitted function, called on chunks of `chunk_size` points
    (default: one grid row per call; the last chunk is padded so every call has the same
    shape).  Inside a chunk, `vmap_size` points run in parallel (vmap) and chunks of them in
    sequence (lax.map); vmap_size=1 uses the least memory.

    Args:
      loss_fn: `loss_fn(params, *args) -> scalar`, deterministic (eval mode); must be hashable
        (functions are) and should be one object across calls to reuse the compile.
      params: trained parameters theta*.
      dir1, dir2: directions with the structure of params (see `random_direction`).
      coords: grid coordinates along both directions (default 51 points on [-1, 1]).
      args: extra arguments of loss_fn (e.g. batch_stats, images, labels).
      chunk_size: grid points per jitted call (None -> len(coords)).
      vmap_size: grid points evaluated in parallel inside a call; must divide chunk_size.
    Returns:
      numpy float32 [len(coords), len(coords)], surface[i, j] = f(coords[j], coords[i]).
    """
    coords = _check_coords(coords)
    for name, direction in (("dir1", dir1), ("dir2", dir2)):
        if jax.tree.structure(direction) != jax.tree.structure(params):
            raise ValueError(f"loss_surface: {name} does not have the structure of params")
    n = coords.size
    chunk = n if chunk_size is None else int(chunk_size)
    if chunk < 1 or vmap_size < 1 or chunk % vmap_size:
        raise ValueError(f"loss_surface: need chunk_size >= 1 and vmap_size >= 1 dividing it, got "
                         f"chunk_size={chunk}, vmap_size={vmap_size}")
    a, b = np.meshgrid(coords, coords)  # [n, n]: a varies along columns, b along rows
    points = np.stack([a.ravel(), b.ravel()], axis=-1).astype(np.float32)  # [n*n, 2]
    points = np.concatenate([points, np.repeat(points[-1:], (-len(points)) % chunk, axis=0)])
    losses = []
    with bar(len(points) // chunk, "loss landscape", unit="chunk") as progress:
        for i in range(0, len(points), chunk):
            losses.append(np.asarray(_losses_at(loss_fn, vmap_size, params, dir1, dir2, tuple(args),
                                                points[i:i + chunk])))
            progress.update(1)
    return np.concatenate(losses)[:n * n].reshape(n, n)


def flatness(surface, coords, radius: float) -> float:
    """Mean loss rise near the trained parameters: mean of f(a, b) - f(0, 0) over the grid
    points with a^2 + b^2 <= radius^2 (points on the circle included), on the raw (unclamped)
    surface.

    Smaller means a flatter basin.  The distances are in units of the filter-normalised
    directions, so values compare models of the same architecture on the same images.
    """
    coords = _check_coords(coords)
    surface = np.asarray(surface, np.float64)
    n = coords.size
    if surface.shape != (n, n):
        raise ValueError(f"flatness: surface has shape {surface.shape}, expected {(n, n)} for "
                         f"{n} coords")
    if not radius > 0:
        raise ValueError(f"flatness: radius must be > 0, got {radius!r}")
    origin = int(np.argmin(np.abs(coords)))
    if abs(coords[origin]) > 1e-9 * max(1.0, float(np.ptp(coords))):
        raise ValueError("flatness: coords must contain 0 (the trained parameters)")
    a, b = np.meshgrid(coords, coords)
    inside = a ** 2 + b ** 2 <= radius ** 2 * (1 + 1e-9)  # [n, n]
    return float(np.mean(surface[inside] - surface[origin, origin]))


def _levels(surfaces):
    """21 shared, increasing contour levels spanning the (clamped) surfaces."""
    low = min(float(np.min(s)) for s in surfaces)
    high = max(float(np.max(s)) for s in surfaces)
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, 21)


def _contour(ax, fig, surface, coords, levels, title):
    x, y = np.meshgrid(coords, coords)
    filled = ax.contourf(x, y, surface, levels=levels, cmap="viridis")
    lines = ax.contour(x, y, surface, levels=levels[::2], colors="k", linewidths=0.5)
    ax.clabel(lines, inline=True, fontsize=6, fmt="%.2f")
    ax.set(title=title, xlabel="direction 1", ylabel="direction 2", aspect="equal")
    fig.colorbar(filled, ax=ax, shrink=0.8, format="%.2f", label="loss")


def _save(fig, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_landscape(surface, coords, path_prefix, title: str, clamp: float = LOSS_CLAMP):
    """Write `<path_prefix>_contour.png` and `<path_prefix>_surface.png` (3-D) of one surface.

    Losses are clamped at `clamp` (Figure 4: 8.0).  Returns the two paths.
    """
    coords = _check_coords(coords)
    if coords.size < 2:
        raise ValueError("plot_landscape: need at least 2 coords per axis to draw a surface")
    z = np.minimum(np.asarray(surface, np.float64), clamp)  # [n, n]
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    _contour(fig.add_subplot(), fig, z, coords, _levels([z]), title)
    contour_path = _save(fig, f"{path_prefix}_contour.png")

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    x, y = np.meshgrid(coords, coords)
    ax.plot_surface(x, y, z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(title=title, xlabel="direction 1", ylabel="direction 2",
           zlabel=f"loss (clamped at {clamp:g})")
    surface_path = _save(fig, f"{path_prefix}_surface.png")
    return contour_path, surface_path


def compare_landscapes(models: Mapping[str, tuple], key, path_prefix, *, coords=DEFAULT_COORDS,
                       clamp: float = LOSS_CLAMP, ignore_bn_and_bias: bool = True,
                       chunk_size: int | None = None, vmap_size: int = 1):
    """Figure 4: surfaces of several models (e.g. Baseline III and RoS-KD) from one direction seed.

    Every model gets directions from the same two keys (the same raw Gaussian draws when the
    architectures match), filter-normalised to its own weights.  Writes each model's contour
    and 3-D plots (`<path_prefix>_<name>_*.png`) and `<path_prefix>_compare.png`, the contours
    side by side with shared levels; in file names every run of characters other than
    letters and digits in <name> becomes "_" ("baseline_iii" stays, "RoS-KD" -> "RoS_KD").

    Args:
      models: name -> (loss_fn, params, args) as taken by `loss_surface`.
      key: jax.random key of the two directions.
      path_prefix, coords, clamp: as in `plot_landscape`.
      ignore_bn_and_bias: as in `random_direction`.
      chunk_size, vmap_size: as in `loss_surface`.
    Returns:
      dict name -> surface [len(coords), len(coords)].
    """
    coords = _check_coords(coords)
    key1, key2 = jax.random.split(key)
    surfaces = {}
    for name, (loss_fn, params, args) in models.items():
        dir1 = random_direction(key1, params, ignore_bn_and_bias=ignore_bn_and_bias)
        dir2 = random_direction(key2, params, ignore_bn_and_bias=ignore_bn_and_bias)
        surfaces[name] = loss_surface(loss_fn, params, dir1, dir2, coords=coords, args=args,
                                      chunk_size=chunk_size, vmap_size=vmap_size)
        plot_landscape(surfaces[name], coords,
                       f"{path_prefix}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}", name, clamp)
    clamped = {name: np.minimum(s, clamp) for name, s in surfaces.items()}
    levels = _levels(list(clamped.values()))
    fig = Figure(figsize=(5.5 * len(clamped), 4.5), layout="constrained")  # colour bars clear of the next panel
    for i, (name, z) in enumerate(clamped.items()):
        _contour(fig.add_subplot(1, len(clamped), i + 1), fig, z, coords, levels, name)
    _save(fig, f"{path_prefix}_compare.png")
    return surfaces
