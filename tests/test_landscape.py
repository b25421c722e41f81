"""Loss landscapes: filter-normalised directions, the surface against direct evaluation,
flatness of analytic surfaces, and the PNG plots."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosjax.eval import landscape

N, H, W, C, K = 16, 8, 8, 3, 4  # images, 8x8 RGB, 4 classes


class _TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> global mean -> Dense: every parameter kind of the zoo.

    Full-precision products, so the comparisons also hold on GPUs that default to TF32.
    """

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), precision="highest")(x)  # kernel [3, 3, 3, 6], bias [6]
        x = nn.BatchNorm(use_running_average=not train)(x)  # scale/bias [6], stats [6]
        x = nn.relu(x).mean(axis=(1, 2))  # [N, 6]
        return nn.Dense(K, precision="highest")(x)  # kernel [6, K], bias [K]


_MODEL = _TinyNet()
_APPLY = functools.partial(_MODEL.apply, train=False)


def _variables(seed):
    """Initialised variables with non-trivial BatchNorm statistics and unequal filter norms."""
    variables = _MODEL.init(jax.random.key(seed), jnp.zeros((1, H, W, C)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, variables["params"])
    params["Conv_0"]["kernel"] = params["Conv_0"]["kernel"] * np.arange(1, 7)  # filter j scaled j+1
    params["BatchNorm_0"]["scale"] = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    params["BatchNorm_0"]["bias"] = rng.normal(0, 0.1, 6).astype(np.float32)
    batch_stats = {"BatchNorm_0": {"mean": rng.normal(0, 0.2, 6).astype(np.float32),
                                   "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}}
    return params, batch_stats


def _data(seed, multilabel=False):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (N, H, W, C)).astype(np.float32)
    labels = ((rng.random((N, K)) < 0.4).astype(np.float32) if multilabel
              else rng.integers(0, K, N).astype(np.int32))
    return images, labels


def _np_loss(params, batch_stats, images, labels, multilabel):
    """Mean CE / summed-BCE of the model in eval mode, computed in float64 numpy."""
    z = np.asarray(_APPLY({"params": params, "batch_stats": batch_stats}, images), np.float64)
    if multilabel:
        return np.mean(np.sum(np.logaddexp(0, z) - labels * z, axis=1))  # BCE with logits
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    return -np.mean(log_p[np.arange(N), labels])


def _moved(params, d1, d2, a, b):
    return jax.tree.map(lambda w, u, v: np.asarray(w, np.float64) + a * np.asarray(u)
                        + b * np.asarray(v), params, d1, d2)


def test_random_direction_has_trained_filter_norms():
    params, _ = _variables(0)
    direction = landscape.random_direction(jax.random.key(1), params)
    for layer in ("Conv_0", "Dense_0"):
        w = np.asarray(params[layer]["kernel"], np.float64)
        d = np.asarray(direction[layer]["kernel"], np.float64)
        assert d.shape == w.shape
        w_norms = np.sqrt(np.sum(w.reshape(-1, w.shape[-1]) ** 2, axis=0))  # one per out filter
        d_norms = np.sqrt(np.sum(d.reshape(-1, d.shape[-1]) ** 2, axis=0))
        np.testing.assert_allclose(d_norms, w_norms, rtol=1e-5)
        assert not np.allclose(d, w)  # a random direction, not the weights
    for leaf in (direction["Conv_0"]["bias"], direction["Dense_0"]["bias"],
                 direction["BatchNorm_0"]["scale"], direction["BatchNorm_0"]["bias"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    other = landscape.random_direction(jax.random.key(2), params)
    assert not np.allclose(other["Conv_0"]["kernel"], direction["Conv_0"]["kernel"])


def test_random_direction_can_include_bias_and_bn():
    params, _ = _variables(0)
    direction = landscape.random_direction(jax.random.key(1), params, ignore_bn_and_bias=False)
    np.testing.assert_array_equal(direction["BatchNorm_0"]["scale"], params["BatchNorm_0"]["scale"])
    np.testing.assert_array_equal(direction["Dense_0"]["bias"], params["Dense_0"]["bias"])
    w = np.asarray(params["Conv_0"]["kernel"], np.float64)
    d = np.asarray(direction["Conv_0"]["kernel"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(d[..., 3]), np.linalg.norm(w[..., 3]), rtol=1e-5)


def test_random_direction_rejects_whole_variables():
    params, batch_stats = _variables(0)
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        landscape.random_direction(jax.random.key(0),
                                   {"params": params, "batch_stats": batch_stats})


@pytest.mark.parametrize("multilabel,chunk_size,vmap_size", [(False, 7, 1), (True, 10, 5)])
def test_loss_surface_matches_direct_loss(multilabel, chunk_size, vmap_size):
    params, batch_stats = _variables(3)
    images, labels = _data(4, multilabel)
    key1, key2 = jax.random.split(jax.random.key(5))
    d1 = landscape.random_direction(key1, params)
    d2 = landscape.random_direction(key2, params)
    traces = []
    base_loss = landscape.dataset_loss_fn(_APPLY, multilabel=multilabel, chunk_size=8)

    def loss_fn(p, *args):
        traces.append(1)  # runs once per trace
        return base_loss(p, *args)

    coords = np.linspace(-1.0, 1.0, 5)  # [-1, -0.5, 0, 0.5, 1]
    surface = landscape.loss_surface(loss_fn, params, d1, d2, coords=coords,
                                     args=(batch_stats, images, labels),
                                     chunk_size=chunk_size, vmap_size=vmap_size)
    assert surface.shape == (5, 5)
    assert len(traces) == 1  # one jitted function for the whole grid
    origin = _np_loss(params, batch_stats, images, labels, multilabel)
    np.testing.assert_allclose(surface[2, 2], origin, rtol=1e-5)
    # surface[i, j] = f(a = coords[j], b = coords[i]); (1, 4) is off both axes and asymmetric.
    off = _np_loss(_moved(params, d1, d2, 1.0, -0.5), batch_stats, images, labels, multilabel)
    np.testing.assert_allclose(surface[1, 4], off, rtol=1e-5)
    assert abs(off - origin) > 1e-3  # the point is really off the minimum


def test_flatness_of_quadratic_surfaces():
    coords = np.array([-1.0, 0.0, 1.0])
    a, b = np.meshgrid(coords, coords)
    bowl = 3.0 + 2.0 * (a ** 2 + b ** 2)
    # radius 1: the centre and its 4 neighbours, rises 0, 2, 2, 2, 2.
    assert landscape.flatness(bowl, coords, 1.0) == pytest.approx(8 / 5)
    # radius 1.5: all 9 points, rises 0, 4 x 2, 4 x 4.
    assert landscape.flatness(bowl, coords, 1.5) == pytest.approx(24 / 9)
    # Fine grid: the mean of k r^2 over a disk of radius R is k R^2 / 2.
    coords = np.linspace(-1.0, 1.0, 201)
    a, b = np.meshgrid(coords, coords)
    assert landscape.flatness(1.0 + 2.0 * (a ** 2 + b ** 2), coords, 0.8) == pytest.approx(
        2.0 * 0.8 ** 2 / 2, rel=0.01)


def test_flatness_needs_the_origin():
    coords = np.linspace(-1.0, 1.0, 4)
    with pytest.raises(ValueError, match="contain 0"):
        landscape.flatness(np.zeros((4, 4)), coords, 0.5)


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_landscape_writes_pngs(tmp_path):
    coords = np.linspace(-1.0, 1.0, 11)
    a, b = np.meshgrid(coords, coords)
    paths = landscape.plot_landscape(12.0 * (a ** 2 + b ** 2), coords, tmp_path / "sub" / "bowl",
                                     "bowl")  # above the 8.0 clamp in the corners
    assert [p.name for p in paths] == ["bowl_contour.png", "bowl_surface.png"]
    assert all(_is_png(p) for p in paths)


def test_compare_landscapes(tmp_path):
    images, labels = _data(6)
    loss_fn = landscape.dataset_loss_fn(_APPLY, multilabel=False)
    models = {}
    for name, seed in (("Baseline III", 7), ("RoS-KD", 8)):
        params, batch_stats = _variables(seed)
        models[name] = (loss_fn, params, (batch_stats, images, labels))
    surfaces = landscape.compare_landscapes(models, jax.random.key(0), tmp_path / "fig4",
                                            coords=np.linspace(-1.0, 1.0, 3))
    for name, (_, params, (batch_stats, _, _)) in models.items():
        np.testing.assert_allclose(surfaces[name][1, 1],
                                   _np_loss(params, batch_stats, images, labels, False),
                                   rtol=1e-5)
    for name in ("fig4_compare.png", "fig4_Baseline_III_contour.png", "fig4_RoS_KD_surface.png"):
        assert _is_png(tmp_path / name)
