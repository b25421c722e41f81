"""Cached teacher outputs (rosjax.distill.cache): replayed views, resumable build, same loss."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rosjax import models
from rosjax.data import device_augment, pipeline
from rosjax.data import views as views_lib
from rosjax.distill import cache, replay
from rosjax.distill.steps import DistillInputs, make_distill_step
from rosjax.distill.weighting import weight_rule
from rosjax.train import parallel
from rosjax.train.state import TrainState

SIZE, CLASSES, BATCH, VIEWS, SEED = 16, 3, 8, 2, 5
STORED = (24, 26)  # holds every image of images(): device batches are padded to it
ROWS = np.arange(2, 18)  # 16 of the 20 source rows: 2 batches per epoch
AUGMENT = views_lib.AugmentConfig.dermoscopy()  # crop, both flips, rotation, colour jitter
MODEL = models.create("tiny_cnn", CLASSES)
MODEL_BF16 = models.create("tiny_cnn", CLASSES, dtype=jnp.bfloat16)


def images(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (20 + r % 5, 24 + r % 3, 3), dtype=np.uint8)}
            for r in range(n)]


def host_variables(model, seed):
    """He-normal kernels drawn with numpy (jit-compiling model.init's RNG is slow on CPU)."""
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(
                np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # biases, BN means

    return jax.tree_util.tree_map_with_path(draw, dict(abstract))


TEACHER_VARIABLES = [host_variables(MODEL, 1), host_variables(MODEL, 2)]
TEACHERS = [(MODEL.apply, v) for v in TEACHER_VARIABLES]
BUILD = dict(image_size=SIZE, augment=AUGMENT, num_views=VIEWS, seed=SEED, batch_size=BATCH,
             stored_shape=STORED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache built in one go: 2 teachers x 2 views x 16 rows."""
    return cache.build_teacher_cache(TEACHERS, images(), ROWS, **BUILD,
                                     directory=tmp_path_factory.mktemp("cache"))


def reference_logits(batch_images):
    """[B, K, C]: each teacher applied on its own, in eval mode."""
    apply = jax.jit(MODEL.apply, static_argnames="train")
    return np.stack([np.asarray(apply(v, batch_images, train=False))
                     for v in TEACHER_VARIABLES], axis=1)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def pixels(batch):
    """float32 [B, S, S, C]: the batch's views rendered as the steps render them."""
    return np.asarray(device_augment.rendered(batch)["image"])


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------- views


def test_apply_view_matches_numpy_reference():
    image = images(1, seed=3)[0]["image"][:20, :24]  # [20, 24, 3]
    x = image.astype(np.float64) / 255
    crop = x[2:18, 3:19]  # box (3, 2, 19, 18) at its own size: no resampling
    view = views_lib.AugmentView(box=(3, 2, 19, 18))
    np.testing.assert_allclose(views_lib.apply_view(image, view, SIZE), crop, atol=1e-6)
    flipped = views_lib.AugmentView(box=(3, 2, 19, 18), horizontal_flip=True, vertical_flip=True)
    np.testing.assert_allclose(views_lib.apply_view(image, flipped, SIZE), crop[::-1, ::-1],
                               atol=1e-6)
    bright = views_lib.AugmentView(box=(3, 2, 19, 18), brightness=1.5)
    np.testing.assert_allclose(views_lib.apply_view(image, bright, SIZE),
                               np.clip(crop * 1.5, 0, 1), atol=1e-6)
    contrast = views_lib.AugmentView(box=(3, 2, 19, 18), contrast=0.5)
    grey = (crop @ np.array([0.299, 0.587, 0.114])).mean()
    np.testing.assert_allclose(views_lib.apply_view(image, contrast, SIZE),
                               np.clip(grey + (crop - grey) * 0.5, 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit an image of 20x24"):
        views_lib.apply_view(image, views_lib.AugmentView(box=(0, 0, 25, 10)), SIZE)


def test_view_records_round_trip():
    full = views_lib.AugmentView(box=(1, 2, 30, 40), horizontal_flip=True, vertical_flip=False,
                                angle=-12.345678901234, brightness=float(np.float32(0.81)),
                                contrast=float(np.float32(1.13)), saturation=None)
    plain = views_lib.AugmentView(box=(0, 0, 5, 6))
    for view in (full, plain):
        assert cache.unpack_view(cache.pack_view(view)) == view


# ------------------------------------------------------------------------------ replay


def test_replay_gives_the_online_views_then_wraps_around(built):
    labels = np.arange(20) % CLASSES
    replayed = take(replay.cached_train_iterator(images(), ROWS, labels, built, image_size=SIZE,
                                                batch_size=BATCH, seed=SEED, num_epochs=3), 6)
    online = list(pipeline.train_iterator(images(), ROWS, labels, image_size=SIZE,
                                          batch_size=BATCH, seed=SEED, augment=AUGMENT,
                                          num_epochs=2, stored_shape=STORED))
    for got, want in zip(replayed[:4], online):  # epochs 0 and 1: views 0 and 1
        for key in ("image", "view", "label", "index"):  # same pixels, same drawn views
            assert_trees_equal(got[key], want[key])
    epoch0 = {int(r): im for b in replayed[:2] for r, im in zip(b["index"], pixels(b))}
    for batch in replayed[4:]:  # epoch 2 replays view 0
        for row, image in zip(batch["index"], pixels(batch)):
            np.testing.assert_array_equal(image, epoch0[int(row)])
    for batch in replayed:  # the stored logits are the teachers' on the view the student renders
        assert batch["teacher_logits"].shape == (BATCH, 2, CLASSES)
        assert batch["teacher_logits"].dtype == np.float32
        np.testing.assert_allclose(batch["teacher_logits"], reference_logits(pixels(batch)),
                                   rtol=1e-5, atol=1e-5)
    one = next(replay.cached_train_iterator(images(), ROWS, labels, built, image_size=SIZE,
                                           batch_size=BATCH, seed=SEED, teacher_indices=[1]))
    np.testing.assert_array_equal(one["teacher_logits"], replayed[0]["teacher_logits"][:, [1]])


def test_replay_resumes_from_iterator_state(built):
    kwargs = dict(image_size=SIZE, batch_size=BATCH, seed=SEED)
    labels = np.zeros(20, np.int32)
    first = replay.cached_train_iterator(images(), ROWS, labels, built, **kwargs)
    take(first, 3)
    state = first.get_state()
    expected = take(first, 2)  # epoch 1 then epoch 2 (view 0 again)
    resumed = replay.cached_train_iterator(images(), ROWS, labels, built, **kwargs)
    resumed.set_state(state)
    for got, want in zip(take(resumed, 2), expected):
        for key in want:
            assert_trees_equal(got[key], want[key])


def test_cached_and_online_steps_give_the_same_loss_and_update(built):
    """The online step runs both teachers on the replayed image; the cached step reads the
    stored logits: same loss terms, same exponential weights, same new parameters."""
    student = MODEL
    tx = optax.sgd(0.1, momentum=0.9)
    params = host_variables(student, 7)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params["params"],
                       batch_stats=params["batch_stats"],
                       opt_state=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                              jax.eval_shape(tx.init, params["params"])),
                       apply_fn=student.apply, tx=tx)
    distill = make_distill_step((MODEL.apply, MODEL.apply), tau=2.0, alpha=0.7,
                                multilabel=False)
    cached_step = replay.cached_distill_step(distill)

    rule = weight_rule("exponential", 2)

    @jax.jit
    def both(state, teachers, batch, key):
        without = {k: v for k, v in batch.items() if k != "teacher_logits"}
        return (distill(state, DistillInputs(teachers=teachers, rule=rule), without, key),
                cached_step(state, DistillInputs(teachers=(), rule=rule), batch, key))

    mesh = parallel.make_mesh()
    batches = take(replay.cached_train_iterator(images(), ROWS, np.arange(20) % CLASSES, built,
                                               image_size=SIZE, batch_size=BATCH, seed=SEED), 2)
    key = jax.random.key(11)
    weight_sums = []
    for batch in batches:
        ((online_state, online), (cached_state, cached)) = both(
            state, tuple(TEACHER_VARIABLES), parallel.shard_batch(batch, mesh), key)
        for name in ("loss", "kd", "ce", "weight_sum", "grad_norm"):
            np.testing.assert_allclose(cached[name], online[name], rtol=1e-5, err_msg=name)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                     cached_state.params, online_state.params)
        weight_sums.append(float(cached["weight_sum"]))
        state = cached_state
    assert weight_sums[0] != weight_sums[1]  # Exp(1) weights redrawn every step


# ------------------------------------------------------------------------------- build


class CountingSource:
    """A list source that counts reads and raises once `fail_after` reads are done."""

    def __init__(self, records, fail_after=None):
        self.records, self.fail_after, self.reads = records, fail_after, 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, row):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise RuntimeError("simulated kill")
        self.reads += 1
        return self.records[row]


def test_host_rendered_cache_replays_host_images(built, tmp_path):
    """augment_on='host': the build renders with PIL and the replay ships those float images;
    same views as the device-rendered cache, pixels and logits within the renderers' tolerance."""
    host = cache.build_teacher_cache(TEACHERS, images(), ROWS, **BUILD, directory=tmp_path,
                                     augment_on="host")
    assert host.meta["augment_on"] == "host" and built.meta["augment_on"] == "device"
    assert np.array_equal(host.views, built.views)
    np.testing.assert_allclose(host.logits, built.logits, atol=0.05)
    labels = np.zeros(20, np.int32)
    kwargs = dict(image_size=SIZE, batch_size=BATCH, seed=SEED)
    got = next(replay.cached_train_iterator(images(), ROWS, labels, host, **kwargs))
    want = next(replay.cached_train_iterator(images(), ROWS, labels, built, **kwargs))
    assert "view" not in got and got["image"].dtype == np.float32
    np.testing.assert_allclose(got["image"], pixels(want), atol=2.5 / 255)
    np.testing.assert_allclose(got["teacher_logits"], reference_logits(got["image"]),
                               rtol=1e-5, atol=1e-5)


def test_build_resumes_after_a_kill(built, tmp_path):
    total = VIEWS * len(ROWS)  # 32 examples, 4 batches of 8
    killed = CountingSource(images(), fail_after=1 + 3 * BATCH + 4)  # dies inside batch 4
    with pytest.raises(RuntimeError, match="simulated kill"):
        cache.build_teacher_cache(TEACHERS, killed, ROWS, **BUILD, directory=tmp_path,
                                  num_threads=1)
    done = json.loads((tmp_path / cache.PROGRESS_FILE).read_text())["done"]
    assert 0 < done < total and done % BATCH == 0
    with pytest.raises(RuntimeError, match="incomplete"):
        cache.TeacherCache.open(tmp_path)

    resumed_source = CountingSource(images())
    resumed = cache.build_teacher_cache(TEACHERS, resumed_source, ROWS, **BUILD,
                                        directory=tmp_path)
    assert resumed_source.reads == 1 + (total - done)  # first image + the missing views only
    np.testing.assert_array_equal(resumed.rows, built.rows)
    assert np.array_equal(resumed.views, built.views)
    np.testing.assert_allclose(resumed.logits, built.logits, rtol=1e-6)

    again = CountingSource(images())
    cache.build_teacher_cache(TEACHERS, again, ROWS, **BUILD, directory=tmp_path)
    assert again.reads == 1  # a complete cache is opened, not rebuilt


def test_bf16_teachers_fill_a_float32_cache(built, tmp_path):
    teachers = [(MODEL_BF16.apply, v) for v in TEACHER_VARIABLES]
    half = cache.build_teacher_cache(teachers, images(), ROWS, **BUILD, directory=tmp_path)
    assert half.logits.dtype == np.float32
    assert np.array_equal(half.views, built.views)
    np.testing.assert_allclose(half.logits, built.logits, rtol=0.05, atol=0.05)
    assert not np.array_equal(half.logits, built.logits)  # really computed in bf16


def test_cache_refuses_other_inputs(built):
    with pytest.raises(ValueError, match="num_views=3, the cache has 2"):
        cache.build_teacher_cache(TEACHERS, images(), ROWS, **dict(BUILD, num_views=3),
                                  directory=built.directory)
    other = [(MODEL.apply, host_variables(MODEL, 9)), TEACHERS[1]]
    with pytest.raises(ValueError, match="different teacher weights"):
        cache.build_teacher_cache(other, images(), ROWS, **BUILD, directory=built.directory)
    labels = np.zeros(20, np.int32)
    kwargs = dict(batch_size=BATCH, seed=0)
    with pytest.raises(ValueError, match="was built at 16 px"):
        replay.cached_train_dataset(images(), ROWS, labels, built, image_size=24, **kwargs)
    with pytest.raises(ValueError, match="source row 0 is not in the teacher cache"):
        replay.cached_train_dataset(images(), np.arange(8), labels, built, image_size=SIZE,
                                   **kwargs)
    with pytest.raises(ValueError, match="must pick from the cache's 2 teachers"):
        replay.cached_train_dataset(images(), ROWS, labels, built, image_size=SIZE,
                                   teacher_indices=[2], **kwargs)
