"""rosjax.models.conv against XLA's convolution: same values and gradients, same variables."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosjax.models import conv


def xla_conv(x, w, stride, pad, groups):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups,
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("kernel,stride,pad,c_in,c_out,groups", [
    (3, 1, 1, 4, 6, 1), (3, 2, 1, 4, 6, 1), (3, 2, 1, 32, 6, 1),  # im2col; per tap (9*32 > 256)
    (1, 2, 0, 4, 6, 1), (7, 2, 3, 3, 5, 1),
    (3, 1, 1, 6, 6, 6), (3, 2, 1, 6, 6, 6), (3, 1, 1, 4, 6, 2)])
def test_values_and_gradients_match_xla_convolution(kernel, stride, pad, c_in, c_out, groups, monkeypatch):
    assert jax.default_backend() == "cpu"  # the CPU formulations are the ones under test
    monkeypatch.setattr(conv, "_MATMUL_GRAD_MIN_AREA", 0)  # the matmul kernel gradient on these small maps too
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 11, c_in)), jnp.float32)  # odd sizes: edge taps
    w = jnp.asarray(rng.normal(size=(kernel, kernel, c_in // groups, c_out)), jnp.float32)
    g = jnp.asarray(rng.normal(size=xla_conv(x, w, stride, pad, groups).shape), jnp.float32)

    def ours(x, w):
        return conv.conv2d(x, w, strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                           groups=groups)

    for fn in (ours, jax.jit(ours)):
        expected, expected_vjp = jax.vjp(lambda a, b: xla_conv(a, b, stride, pad, groups), x, w)
        got, got_vjp = jax.vjp(fn, x, w)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_vjp(g), expected_vjp(g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_variables_and_bfloat16_output_are_those_of_nn_conv():
    x = jnp.asarray(np.random.default_rng(1).random((2, 8, 8, 4)), jnp.float32)
    ours = conv.Conv(6, 3, strides=2, padding=1, dtype=jnp.bfloat16)
    flax_conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                        dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = flax_conv.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables)
    got, expected = ours.apply(variables, x), flax_conv.apply(variables, x)
    assert got.dtype == expected.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), np.float32(expected), rtol=2e-2, atol=2e-2)
