"""Views rendered on the device (rosjax.data.device_augment) against the PIL host reference.

Stated tolerance, on [0, 1] pixels: max abs error <= 2.5/255 and mean abs error <= 0.25/255.
Where they differ it is by a rounding: the device resamples in float32, PIL in 22-bit fixed
point (resize) and float64 (rotation), so a grey level that PIL rounds or truncates one way
can land on the other (1/255), and colour jitter then scales that difference (to ~2/255).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rosjax import models
from rosjax.data import device_augment
from rosjax.data import views as views_lib
from rosjax.train import parallel, steps
from rosjax.train.state import TrainState

MAX_ERROR, MEAN_ERROR = 2.5 / 255, 0.25 / 255
STORED = (48, 56)


def smooth_images(n, channels, seed):
    """uint8 images of differing sizes (up to STORED), random but smooth like a photograph,
    with some sharp noise: blocks of 8 px bilinearly upsampled plus +-20 grey levels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(24, STORED[0] + 1)), int(rng.integers(24, STORED[1] + 1))
        coarse = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, channels))
        yy, xx = np.linspace(0, h // 8 + 1, h), np.linspace(0, w // 8 + 1, w)
        y0, x0 = np.floor(yy).astype(int).clip(0, h // 8), np.floor(xx).astype(int).clip(0, w // 8)
        fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
        c = coarse
        up = ((1 - fy) * ((1 - fx) * c[y0][:, x0] + fx * c[y0][:, x0 + 1])
              + fy * ((1 - fx) * c[y0 + 1][:, x0] + fx * c[y0 + 1][:, x0 + 1]))
        out.append(np.clip(up + rng.uniform(-20, 20, up.shape), 0, 255).astype(np.uint8))
    return out


def ship(images, views, size):
    return views_lib.image_batch(images, views, list(range(len(images))), image_size=size,
                                channels=images[0].shape[2], augment_on="device",
                                stored_shape=STORED)


def host_reference(images, views, size):
    return np.stack([views_lib.apply_view(image, view, size) for image, view in zip(images, views)])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("augment", [views_lib.AugmentConfig.dermoscopy(),
                                     views_lib.AugmentConfig.chest_xray(),
                                     views_lib.AugmentConfig(crop_scale=(0.08, 1.0))],
                         ids=["dermoscopy", "chest_xray", "torchvision"])
def test_training_views_match_the_host_reference(augment, channels):
    images = smooth_images(24, channels, seed=channels)
    views = [views_lib.draw_view(*image.shape, augment, np.random.default_rng([3, 0, row]))
             for row, image in enumerate(images)]
    size = 32  # down- and upscaled crops: stored sides 24..56, crops 8%..100%
    got = np.asarray(device_augment.rendered(ship(images, views, size))["image"])
    want = host_reference(images, views, size)
    assert got.shape == want.shape == (24, size, size, channels) and got.dtype == np.float32
    error = np.abs(got - want)
    assert error.max() <= MAX_ERROR and error.mean() <= MEAN_ERROR, (error.max() * 255,
                                                                     error.mean() * 255)


def test_evaluation_centre_crop_matches_the_host_reference():
    images = smooth_images(16, 3, seed=7)
    for size in (16, 40):  # downscale and upscale of the fractional centre box
        views = [views_lib.center_view(*image.shape[:2], size) for image in images]
        got = np.asarray(device_augment.rendered(ship(images, views, size))["image"])
        want = np.stack([views_lib.center_crop(image, size) for image in images])
        error = np.abs(got - want)
        assert error.max() <= 1.5 / 255 and error.mean() <= MEAN_ERROR


def test_crops_flips_and_jitter_against_numpy():
    """Independent of PIL: a box of the output size is a slice, flips reverse it, brightness
    scales it (no rounding anywhere), a 180-degree turn of the whole image reverses both axes."""
    image = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop = image[5:25, 7:27].astype(np.float32) / 255  # box (7, 5, 27, 25) at 20 px
    views = [views_lib.AugmentView(box=(7, 5, 27, 25)),
             views_lib.AugmentView(box=(7, 5, 27, 25), horizontal_flip=True),
             views_lib.AugmentView(box=(7, 5, 27, 25), vertical_flip=True, brightness=0.5),
             views_lib.AugmentView(box=(7, 5, 27, 25), angle=180.0)]
    batch = views_lib.image_batch([image] * 4, views, [0] * 4, image_size=20, channels=3,
                                 augment_on="device", stored_shape=(30, 40))
    got = np.asarray(device_augment.rendered(batch)["image"])
    np.testing.assert_allclose(got[0], crop, atol=1e-6)
    np.testing.assert_allclose(got[1], crop[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(got[2], crop[::-1] * 0.5, atol=1e-6)
    # 180 degrees: sample points on pixel centres up to float32 cos/sin (~1e-7 px), truncated.
    np.testing.assert_allclose(got[3], crop[::-1, ::-1], atol=1 / 255 + 1e-6)


def test_batches_without_views_pass_through():
    batch = {"image": np.full((2, 4, 4, 3), 0.25, np.float32), "label": np.arange(2)}
    out = device_augment.render(batch)
    assert out.keys() == batch.keys() and out["image"] is batch["image"]
    with pytest.raises(ValueError, match="uint8"):
        device_augment.render_images(jnp.zeros((1, 4, 4, 3)), ship(
            smooth_images(1, 3, 0), [views_lib.AugmentView(box=(0, 0, 4, 4))], 4)["view"])


# ----------------------------------------------------------------------- 1 vs 4 devices


def test_one_and_four_devices_render_and_train_alike():
    """The same shipped batch, split over 4 devices or on one: same pixels, and a train step
    that renders inside its program matches the step fed the host-rendered floats."""
    assert jax.device_count() >= 4, "tests/conftest.py sets 4 CPU devices"
    images = smooth_images(8, 3, seed=5)
    views = [views_lib.draw_view(*image.shape, views_lib.AugmentConfig.dermoscopy(),
                                np.random.default_rng([1, 0, row])) for row, image in enumerate(images)]
    shipped = dict(ship(images, views, 16), label=np.arange(8, dtype=np.int32) % 3)
    one, four = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh(jax.devices()[:4])
    render = {n: jax.jit(device_augment.render, in_shardings=parallel.data_sharding(m),
                         out_shardings=parallel.replicated(m)) for n, m in (("one", one), ("four", four))}
    on_one = np.asarray(render["one"](parallel.shard_batch(shipped, one))["image"])
    on_four = np.asarray(render["four"](parallel.shard_batch(shipped, four))["image"])
    np.testing.assert_array_equal(on_four, on_one)

    model = models.create("tiny_cnn", 3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    tx = optax.sgd(0.1)

    def fresh():
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                          apply_fn=model.apply, tx=tx)

    step = functools.partial(steps.train_step, multilabel=False)
    key = jax.random.key(2)
    _, shipped_metrics = parallel.jit_train_step(step, four)(
        parallel.replicate(fresh(), four), parallel.shard_batch(shipped, four),
        parallel.replicate(key, four))
    floats = {"image": host_reference(images, views, 16), "label": shipped["label"]}
    _, host_metrics = parallel.jit_train_step(step, one)(
        parallel.replicate(fresh(), one), parallel.shard_batch(floats, one),
        parallel.replicate(key, one))
    np.testing.assert_allclose(float(shipped_metrics["loss"]), float(host_metrics["loss"]),
                               rtol=1e-3)
