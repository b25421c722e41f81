"""Replaying cached teacher outputs (`rosjax.distill.cache`) while a student trains.

`cached_train_iterator` is the training pipeline of `rosjax.data.pipeline` with the cache's
views replayed: in epoch e each example gets its stored view e mod E and the teachers' logits on
that view, as `teacher_logits` [B, K, C] in the batch, the pixels shipped the way the cache was
built. `cached_distill_step` adapts the distillation step to those batches: no teacher runs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import grain
import jax.numpy as jnp
import numpy as np

from rosjax.data import pipeline
from rosjax.data import views as views_lib
from rosjax.distill.cache import LOGITS_FILE, VIEWS_FILE, TeacherCache, unpack_view


class _CachedBatch(grain.transforms.MapWithIndex):
    """(global step, [B] positions into rows) -> host batch with replayed views and logits.

    Holds the cache's folder, not its arrays, and maps them on first use, so grain worker
    processes receive a small pickle and share the page cache.
    """

    def __init__(self, source, rows, cache_positions, labels, *, directory, teacher_indices,
                 image_size, steps_per_epoch, num_views, host_slice, channels, augment_on,
                 stored_shape):
        self._source, self._rows, self._cache_positions = source, rows, cache_positions
        self._labels, self._directory = labels, directory
        self._teacher_indices, self._image_size = teacher_indices, image_size
        self._steps_per_epoch, self._num_views = steps_per_epoch, num_views
        self._host_slice = host_slice
        self._shipping = dict(image_size=image_size, channels=channels, augment_on=augment_on,
                              stored_shape=stored_shape)
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def map_with_index(self, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(self._directory / VIEWS_FILE, mmap_mode="r"),
                            np.load(self._directory / LOGITS_FILE, mmap_mode="r"))
        views, logits = self._arrays
        positions = positions[self._host_slice]  # [B_host]
        view_index = (step // self._steps_per_epoch) % self._num_views
        rows, at = self._rows[positions], self._cache_positions[positions]
        images = [views_lib.checked_image(self._source[row], row) for row in rows.tolist()]
        replayed = [unpack_view(record) for record in views[view_index][at]]
        pixels = views_lib.image_batch(images, replayed, rows.tolist(), **self._shipping)
        teacher_logits = logits[view_index][at][:, self._teacher_indices]  # [B_host, K, C]
        return {**pixels, "label": self._labels[positions],
                "index": rows.astype(np.int32),
                "teacher_logits": np.ascontiguousarray(teacher_logits, np.float32)}


def cached_train_dataset(source, indices, labels, cache: TeacherCache, *, image_size: int,
                         batch_size: int, seed: int, num_epochs: int | None = None,
                         teacher_indices: Sequence[int] | None = None,
                         shard_index: int | None = None, shard_count: int | None = None,
                         num_workers: int = 0, num_threads: int = 2,
                         prefetch: int = 2) -> grain.IterDataset:
    """`pipeline.train_dataset` with stored views replayed and their teacher logits attached.

    Same shuffle, batching, host sharding and resumable grain state as
    `pipeline.train_dataset(..., seed=seed)`, the pixels shipped as the cache was built
    (`augment_on` and `stored_shape` of its meta.json); each batch also has
    `teacher_logits` float32 [B_host, K, C] (K = len(teacher_indices), default every teacher
    of the cache). Epoch e replays view e mod E of each example.

    Args:
      source, indices, labels, image_size, batch_size, seed, num_epochs, shard_index,
        shard_count, num_workers, num_threads, prefetch: as in `pipeline.train_dataset`.
      cache: the opened cache; every row of `indices` must be in it, and `image_size` must be
        the size it was built at.
      teacher_indices: which of the cache's teachers to hand out (e.g. [4] for baseline II's
        single teacher).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size != cache.image_size:
        raise ValueError(f"image_size={image_size}, but the teacher cache {cache.directory} "
                         f"was built at {cache.image_size} px: rebuild it at this size")
    teacher_indices = np.arange(cache.num_teachers) if teacher_indices is None else (
        np.asarray(teacher_indices, np.int64))
    if teacher_indices.size == 0 or teacher_indices.min() < 0 or (
            teacher_indices.max() >= cache.num_teachers):
        raise ValueError(f"teacher_indices {teacher_indices.tolist()} must pick from the "
                         f"cache's {cache.num_teachers} teachers")
    rows, row_labels = pipeline.check_rows(source, indices, labels)
    shard_index, shard_count, host_batch = pipeline.host_shard(
        batch_size, shard_index, shard_count)
    # The order of pipeline.train_dataset, so a cached run sees the online run's batches.
    positions, steps_per_epoch = pipeline.shuffled_position_batches(len(rows), batch_size, seed,
                                                                   num_epochs)
    host_slice = slice(shard_index * host_batch, (shard_index + 1) * host_batch)
    ds = positions.map_with_index(_CachedBatch(
        source, rows, cache.positions(rows), row_labels, directory=cache.directory,
        teacher_indices=teacher_indices, image_size=image_size,
        steps_per_epoch=steps_per_epoch, num_views=cache.num_views, host_slice=host_slice,
        channels=cache.meta["channels"], augment_on=cache.meta["augment_on"],
        stored_shape=tuple(cache.meta["stored_shape"])))
    return pipeline.to_iter_dataset(ds, num_threads=num_threads, prefetch=prefetch,
                                    num_workers=num_workers)


def cached_train_iterator(source, indices, labels, cache: TeacherCache,
                          **kwargs) -> grain.DatasetIterator:
    """`iter(cached_train_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
    return iter(cached_train_dataset(source, indices, labels, cache, **kwargs))


@functools.lru_cache(maxsize=16)
def cached_distill_step(distill_step: Callable) -> Callable:
    """Adapts `make_distill_step(...)`'s step to cached batches; no teacher runs. One object per
    step, so the runs sharing the step share its jitted program (`parallel.jit_train_step`).

    Returns `step(state, inputs, batch, run_key) -> (state, metrics)` for
    `parallel.jit_train_step(step, mesh, frozen=inputs)`, with `inputs` a `DistillInputs`
    without teacher variables. The batch's `teacher_logits` arrive as [B, K, C] (batch axis
    first, so they shard like the images) and are transposed to the step's [K, B, C] inside the
    compiled program.
    """
    def step(state, inputs, batch, run_key):
        batch = dict(batch, teacher_logits=jnp.swapaxes(batch["teacher_logits"], 0, 1))
        return distill_step(state, inputs, batch, run_key)
    return step
