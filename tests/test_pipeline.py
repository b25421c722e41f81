"""grain input pipeline (rosjax.data.pipeline) on small in-memory sources.

Batch tests run both ways of shipping (augment_on): device batches are rendered with
`device_augment.rendered` before their pixels are checked.
"""
import jax
import numpy as np
import pytest
from PIL import Image

from rosjax.data import device_augment, pipeline
from rosjax.data import views as views_lib

SIZE = 32  # output side of every test image
STORED = (40, 48)  # a stored shape that holds every test image below
BOTH = pytest.mark.parametrize("augment_on", views_lib.AUGMENT_ON)


def constant_source(n, channels=3):
    """Row r is a constant image of value r (r < 256), of varying size."""
    return [{"image": np.full((34 + r % 7, 36 + r % 5, channels), r, np.uint8)} for r in range(n)]


def random_source(n, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (40, 48, channels), dtype=np.uint8)} for _ in range(n)]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def pixels(batch):
    """float32 [B, S, S, C] in [0, 1]: the host's images, or the device's rendering of the views."""
    return np.asarray(device_augment.rendered(batch)["image"])


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:  # 'view' is a pytree (AugmentParams) of arrays
            jax.tree.map(np.testing.assert_array_equal, x[key], y[key])


CROP_AND_FLIP = views_lib.AugmentConfig(crop_scale=(0.5, 1.0), horizontal_flip=True,
                                       vertical_flip=True)


@BOTH
@pytest.mark.parametrize("channels, augment", [
    (3, views_lib.AugmentConfig.dermoscopy()), (1, views_lib.AugmentConfig.chest_xray())])
def test_train_batch_shapes_dtypes_range(channels, augment, augment_on):
    source = random_source(40, channels)
    multi_hot = (np.random.default_rng(1).random((40, 6)) < 0.3).astype(np.uint8)
    batch = next(pipeline.train_iterator(source, np.arange(40), multi_hot, image_size=SIZE,
                                         batch_size=8, seed=0, augment=augment,
                                         augment_on=augment_on))
    if augment_on == "device":  # the stored pixels and the views, 4x fewer bytes than floats
        assert batch["image"].shape == (8, 40, 48, channels) and batch["image"].dtype == np.uint8
        view = batch["view"]
        assert view.image_size == SIZE and view.box.shape == (8, 4) and view.flips.shape == (8, 2)
        assert view.angle.shape == (8,) and view.jitter.shape == (8, 3)
        np.testing.assert_array_equal(view.size, np.tile([40, 48], (8, 1)))
    image = pixels(batch)
    assert image.shape == (8, SIZE, SIZE, channels) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05  # real pixels, not a blank batch
    assert batch["label"].shape == (8, 6) and batch["label"].dtype == np.float32
    assert batch["index"].shape == (8,) and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], multi_hot[batch["index"]])


@BOTH
def test_train_images_and_labels_follow_the_source_row(augment_on):
    source = constant_source(120)  # sizes differ: device batches pad them to STORED
    labels = np.random.default_rng(2).integers(0, 7, 120)
    indices = np.arange(10, 110)
    for batch in pipeline.train_iterator(source, indices, labels, image_size=SIZE, batch_size=10,
                                         seed=3, augment=CROP_AND_FLIP, num_epochs=1,
                                         augment_on=augment_on, stored_shape=STORED):
        assert batch["label"].dtype == np.int32
        image = pixels(batch)  # the padding never enters a view
        rows = np.round(image[:, 0, 0, 0] * 255).astype(int)  # row written in the pixels
        np.testing.assert_allclose(image, np.broadcast_to(
            rows[:, None, None, None] / 255, image.shape), atol=1e-6)
        np.testing.assert_array_equal(rows, batch["index"])
        np.testing.assert_array_equal(batch["label"], labels[rows])


def test_epochs_shuffle_and_drop_remainder():
    indices = np.arange(3, 47)  # 44 examples, batch 8: 5 batches an epoch, 4 dropped
    batches = list(pipeline.train_iterator(constant_source(50), indices, np.zeros(50, int),
                                           image_size=SIZE, batch_size=8, seed=4, augment=None,
                                           num_epochs=2, stored_shape=STORED))
    assert len(batches) == 10
    epochs = [np.concatenate([b["index"] for b in batches[5 * e:5 * e + 5]]) for e in range(2)]
    for order in epochs:
        assert len(set(order.tolist())) == 40 and set(order.tolist()) <= set(indices.tolist())
        assert not np.array_equal(order, np.sort(order))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_train_deterministic_for_seed():
    source, labels = random_source(30), np.arange(30) % 3
    kwargs = dict(image_size=SIZE, batch_size=6, augment=views_lib.AugmentConfig.dermoscopy())
    a = take(pipeline.train_iterator(source, np.arange(30), labels, seed=5, **kwargs), 7)
    b = take(pipeline.train_iterator(source, np.arange(30), labels, seed=5, **kwargs), 7)
    c = take(pipeline.train_iterator(source, np.arange(30), labels, seed=6, **kwargs), 7)
    assert_batches_equal(a, b)
    assert not np.array_equal(np.concatenate([x["index"] for x in a]),
                              np.concatenate([x["index"] for x in c]))


def test_host_shards_compose_the_global_batch():
    source, labels = random_source(36), np.arange(36) % 4
    kwargs = dict(image_size=SIZE, batch_size=8, seed=7, augment=views_lib.AugmentConfig.dermoscopy())
    whole = take(pipeline.train_iterator(source, np.arange(36), labels, shard_index=0,
                                         shard_count=1, **kwargs), 6)
    hosts = [take(pipeline.train_iterator(source, np.arange(36), labels, shard_index=h,
                                          shard_count=2, **kwargs), 6) for h in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            jax.tree.map(lambda x, a, b: np.testing.assert_array_equal(x, np.concatenate([a, b])),
                         batch[key], hosts[0][step][key], hosts[1][step][key])


def test_resume_from_iterator_state():
    source, labels = random_source(40), np.arange(40) % 5
    kwargs = dict(image_size=SIZE, batch_size=8, seed=8, augment=views_lib.AugmentConfig.dermoscopy())
    first = pipeline.train_iterator(source, np.arange(40), labels, **kwargs)
    take(first, 3)
    state = first.get_state()
    expected = take(first, 2)  # batches 4 and 5 cross into the second epoch
    resumed = pipeline.train_iterator(source, np.arange(40), labels, **kwargs)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), expected)


def test_worker_process_gives_the_in_process_batches():
    source, labels = random_source(24), np.arange(24) % 2
    kwargs = dict(image_size=SIZE, batch_size=4, seed=9, augment=views_lib.AugmentConfig.dermoscopy())
    expected = take(pipeline.train_iterator(source, np.arange(24), labels, **kwargs), 3)
    iterator = pipeline.train_iterator(source, np.arange(24), labels, num_workers=1, **kwargs)
    try:
        got = [jax.tree.map(np.array, batch) for batch in take(iterator, 3)]
    finally:
        iterator.close()
    assert_batches_equal(got, expected)


# ------------------------------------------------------------------------ augmentation


def test_flips_only_mirror_the_image():
    image = np.random.default_rng(10).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    config = views_lib.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                    horizontal_flip=True, vertical_flip=False)
    seen = set()
    for seed in range(40):
        out = np.round(views_lib.augment_image(image, SIZE, config,
                                              np.random.default_rng(seed)) * 255).astype(np.uint8)
        if np.array_equal(out, image):
            seen.add("same")
        elif np.array_equal(out, image[:, ::-1]):
            seen.add("mirrored")
        else:
            pytest.fail("output is neither the image nor its left-right mirror")
    assert seen == {"same", "mirrored"}


def test_rotation_keeps_centre_and_blackens_corners():
    white = np.full((SIZE, SIZE, 1), 255, np.uint8)
    config = views_lib.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                    horizontal_flip=False, rotation_degrees=30.0)
    corners = []
    for seed in range(20):
        out = views_lib.augment_image(white, SIZE, config, np.random.default_rng(seed))
        assert out[SIZE // 2, SIZE // 2, 0] == pytest.approx(1.0)
        corners.append(out[0, 0, 0])
    assert min(corners) < 0.5  # some rotation turned a corner black


def test_colour_jitter_bounds():
    grey = np.full((SIZE, SIZE, 3), 100, np.uint8)
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip=False)
    values = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        out = views_lib.augment_image(grey, SIZE, views_lib.AugmentConfig(brightness=0.2, **base), rng)
        assert np.ptp(out) == 0  # brightness scales every pixel alike
        values.append(out[0, 0, 0])
        # A flat grey image has no contrast and no saturation to change.
        for name in ("contrast", "saturation"):
            same = views_lib.augment_image(grey, SIZE, views_lib.AugmentConfig(**{name: 0.5}, **base), rng)
            np.testing.assert_allclose(same, 100 / 255, atol=1e-6)
    assert 100 / 255 * 0.8 - 1e-6 <= min(values) < max(values) <= 100 / 255 * 1.2 + 1e-6


def test_center_crop_matches_resize_then_crop_reference():
    height, width = 48, 64
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)],
                     -1).astype(np.uint8)
    # torchvision eval: Resize(37) (37 = round(32 / 0.875)) then CenterCrop(32).
    resized = np.asarray(Image.fromarray(image).resize((49, 37), Image.BILINEAR))
    top, left = round((37 - SIZE) / 2), round((49 - SIZE) / 2)
    reference = resized[top:top + SIZE, left:left + SIZE] / 255
    np.testing.assert_allclose(views_lib.center_crop(image, SIZE), reference, atol=0.03)


def test_center_crop_keeps_the_middle_of_a_wide_image():
    image = np.zeros((40, 120, 3), np.uint8)
    image[:, 40:80] = 255  # the central 40 x 40 square is white, the sides black
    np.testing.assert_allclose(views_lib.center_crop(image, SIZE), 1.0, atol=1e-6)


# -------------------------------------------------------------------------- evaluation


@BOTH
@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_sees_every_example_once(shard_count, augment_on):
    source = constant_source(60)
    labels = np.random.default_rng(11).integers(0, 4, 60)
    indices = np.random.default_rng(12).permutation(60)[:37]
    batches = [[dict(b, image=pixels(b)) for b in pipeline.eval_batches(
                   source, indices, labels, image_size=SIZE, batch_size=16, shard_index=h,
                   shard_count=shard_count, augment_on=augment_on, stored_shape=STORED)]
               for h in range(shard_count)]
    assert all(len(b) == 3 for b in batches)  # ceil(37 / 16)
    per_host = 16 // shard_count
    seen = []
    for step in range(3):
        for host in range(shard_count):
            batch = batches[host][step]
            assert batch["image"].shape == (per_host, SIZE, SIZE, 3)
            assert batch["mask"].dtype == bool and batch["label"].shape == (per_host,)
            mask = batch["mask"]
            seen.extend(batch["index"][mask].tolist())
            np.testing.assert_array_equal(batch["label"][mask], labels[batch["index"][mask]])
            np.testing.assert_allclose(batch["image"][mask][:, 5, 5, 0],
                                       batch["index"][mask] / 255, atol=1e-6)
            assert (batch["index"][~mask] == -1).all() and (batch["image"][~mask] == 0).all()
    assert seen == indices.tolist()


# ------------------------------------------------------------------------------ errors


def test_pipeline_rejects_bad_input():
    source = constant_source(10)
    kwargs = dict(image_size=SIZE, seed=0, augment=None)
    with pytest.raises(ValueError, match="multiple of shard_count=2"):
        pipeline.train_dataset(source, np.arange(10), np.zeros(10, int), batch_size=3, shard_index=0,
                               shard_count=2, **kwargs)
    with pytest.raises(ValueError, match="indexed by source row"):
        pipeline.train_dataset(source, np.arange(10), np.zeros(9, int), batch_size=2, **kwargs)
    with pytest.raises(ValueError, match=r"indices\[1\] = 10"):
        pipeline.train_dataset(source, np.array([0, 10]), np.zeros(10, int), batch_size=2, **kwargs)
    with pytest.raises(ValueError, match="no full batch"):
        pipeline.train_dataset(source, np.arange(3), np.zeros(10, int), batch_size=4, **kwargs)
    bad = source + [{"image": np.zeros((8, 8, 3), np.float32)}]
    with pytest.raises(ValueError, match=r"source\[10\]\['image'\] must be uint8"):
        next(pipeline.eval_batches(bad, np.array([10]), np.zeros(11, int), image_size=SIZE,
                                   batch_size=1))
    with pytest.raises(ValueError, match="crop_scale"):
        views_lib.AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="rotation_degrees"):
        views_lib.AugmentConfig(rotation_degrees=-5)
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        pipeline.train_dataset(source, np.arange(10), np.zeros(10, int), batch_size=2,
                               augment_on="gpu", **kwargs)
    with pytest.raises(ValueError, match=r"source\[1\]\['image'\] is 35x37, larger than the "
                                         r"stored shape 34x36"):  # default: the first image's
        next(pipeline.eval_batches(source, np.arange(10), np.zeros(10, int), image_size=SIZE,
                                   batch_size=2))
