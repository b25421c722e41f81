"""grain input pipeline: read, augment, batch and shard images for training and evaluation.

Works from any random-access source: `len(source)` and `source[row]` -> dict whose 'image' is
uint8 [H, W, C] (what `tfds.data_source` returns for an Image feature; C is 1 or 3, sizes may
differ between rows). Labels come as a separate array indexed by source row, so that noisy
labels (`rosjax.data.noise`) replace the stored ones without rewriting the dataset.

Batches follow the project contract (numpy, host-local), in one of two forms (`augment_on`):
  device (default): image uint8 [B, H, W, C], the stored pixels (zero-padded to the batch's
           stored shape), and view, the drawn views as `device_augment.AugmentParams`; the
           jitted step renders them (`device_augment.render`) into float32 [B, S, S, C]
  host:    image float32 [B, S, S, C] in [0, 1], rendered here with PIL (the reference)
  (no mean/std normalisation either way: the model does it)
  label  int32 [B] (one-label) or float32 [B, C] (multi-hot)
  index  int32 [B], the source row of each example (-1 on padded evaluation rows)
  mask   bool [B], evaluation only: False on padding rows

Training order: every epoch is a fresh seeded shuffle of `indices` (grain's index shuffle),
the incomplete last global batch is dropped, and global batch b of an epoch is the same for
any number of hosts: host h reads rows [h * B/H, (h + 1) * B/H) of it. An example's
augmentation draws from `np.random.default_rng([seed, epoch, row])`, so it does not depend on
shuffle position, worker count or host count, and grain iterator state (get_state/set_state,
or `grain.checkpoint.CheckpointSave`) resumes at the exact batch.

Evaluation resizes the shorter side to image_size / 0.875 and centre-crops image_size (the
torchvision ImageNet protocol) and pads the last batch, so every example is scored exactly
once with fixed shapes (one compile).

Device batches need one stored shape [H, W] for every batch (one compile): `stored_shape`,
by default the shape of the first image of `indices`. The prepared datasets store squares of
one size, so nothing is padded there; a smaller image of a raw source is placed top-left in
zeros and its own size travels in the view (the resampling never reads the padding), a larger
one is an error naming `stored_shape`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags

from rosjax.data import views as views_lib

# ----------------------------------------------------------------------------- batches


def _label_array(labels: np.ndarray) -> np.ndarray:
    """Contract dtypes: int32 [N] class ids or float32 [N, C] multi-hot."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if labels.size and labels.dtype.kind not in "iu":
            raise ValueError(f"one-label labels must be integers, got {labels.dtype}")
        return labels.astype(np.int32)
    if labels.ndim == 2:
        return labels.astype(np.float32)
    raise ValueError(f"labels must be [N] or [N, C], got shape {labels.shape}")


def check_rows(source, indices: np.ndarray | Sequence[int],
                labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates indices against the source; returns (rows [n] int64, labels of rows)."""
    rows = np.asarray(indices)
    if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
        raise ValueError(f"indices must be a non-empty 1-D integer array, got {rows.dtype} "
                         f"{rows.shape}")
    labels = _label_array(labels)
    if len(labels) != len(source):
        raise ValueError(f"labels has {len(labels)} rows but the source has {len(source)}; "
                         "labels are indexed by source row")
    bad = np.flatnonzero((rows < 0) | (rows >= len(source)))
    if bad.size:
        raise ValueError(f"indices[{bad[0]}] = {rows[bad[0]]} is outside the source "
                         f"(len {len(source)})")
    rows = rows.astype(np.int64)
    return rows, labels[rows]


def host_shard(batch_size: int, shard_index: int | None,
           shard_count: int | None) -> tuple[int, int, int]:
    """Returns (shard_index, shard_count, per-host batch size); defaults to this JAX process."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be a positive multiple "
                         f"of shard_count={shard_count}")
    return shard_index, shard_count, batch_size // shard_count


class _TrainBatch(grain.transforms.MapWithIndex):
    """(global step, [B] positions into rows) -> this host's augmented batch."""

    def __init__(self, source, rows, labels, *, image_size, augment, seed, steps_per_epoch,
                 host_slice, augment_on, stored_shape):
        self._source, self._rows, self._labels = source, rows, labels
        self._image_size, self._augment, self._seed = image_size, augment, seed
        self._steps_per_epoch, self._host_slice = steps_per_epoch, host_slice
        self._augment_on, self._stored_shape = augment_on, stored_shape

    def map_with_index(self, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        positions = positions[self._host_slice]  # [B_host]
        epoch = step // self._steps_per_epoch
        rows = self._rows[positions]
        images, views = [], []
        for row in rows.tolist():
            image = views_lib.checked_image(self._source[row], row)
            if self._augment is None:
                views.append(views_lib.center_view(*image.shape[:2], self._image_size))
            else:
                rng = np.random.default_rng([self._seed, epoch, row])
                views.append(views_lib.draw_view(*image.shape, self._augment, rng))
            images.append(image)
        pixels = views_lib.image_batch(images, views, rows.tolist(), image_size=self._image_size,
                             channels=images[0].shape[2], augment_on=self._augment_on,
                             stored_shape=self._stored_shape)
        return {**pixels, "label": self._labels[positions], "index": rows.astype(np.int32)}


class _EvalBatch(grain.transforms.Map):
    """Global batch number -> this host's share of it, padded, with a validity mask."""

    def __init__(self, source, rows, labels, *, image_size, channels, batch_size, host_batch,
                 shard_index, augment_on, stored_shape):
        self._source, self._rows, self._labels = source, rows, labels
        self._image_size, self._channels = image_size, channels
        self._batch_size, self._host_batch, self._shard_index = batch_size, host_batch, shard_index
        self._augment_on, self._stored_shape = augment_on, stored_shape

    def map(self, batch_number: int) -> dict[str, np.ndarray]:
        start = batch_number * self._batch_size + self._shard_index * self._host_batch
        positions = np.arange(start, start + self._host_batch)  # [B_host]
        mask = positions < len(self._rows)
        label = np.zeros((self._host_batch,) + self._labels.shape[1:], self._labels.dtype)
        index = np.full(self._host_batch, -1, np.int32)
        images, views = [], []
        for i in np.flatnonzero(mask).tolist():  # the valid rows come first
            row = int(self._rows[positions[i]])
            images.append(views_lib.checked_image(self._source[row], row))
            views.append(views_lib.center_view(*images[-1].shape[:2], self._image_size))
            label[i], index[i] = self._labels[positions[i]], row
        pixels = views_lib.image_batch(images, views, index.tolist(), image_size=self._image_size,
                             channels=self._channels, augment_on=self._augment_on, stored_shape=self._stored_shape,
                             batch_rows=self._host_batch)
        return {**pixels, "label": label, "index": index, "mask": mask}


def _allow_grain_workers() -> None:
    """grain 0.2.18's mp_prefetch reads the absl flag grain_enable_multiprocess_worker_profiling,
    which raises UnparsedFlagAccessError outside an absl app (pytest, notebooks, plain scripts).
    Marking the flags parsed keeps every flag at its default; an absl app has parsed them
    already, so nothing changes there."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def train_dataset(source, indices, labels, *, image_size: int, batch_size: int, seed: int,
                  augment: views_lib.AugmentConfig | None, num_epochs: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_workers: int = 0, num_threads: int = 2, prefetch: int = 2,
                  augment_on: str = "device",
                  stored_shape: tuple[int, int] | None = None) -> grain.IterDataset:
    """Shuffled, augmented, sharded training batches as a grain IterDataset.

    Args:
      source: random-access source, `source[row]['image']` uint8 [H, W, C].
      indices: [n] source rows to train on (a split or a teacher subset).
      labels: [len(source)] ints or [len(source), C] multi-hot, indexed by source row.
      image_size: side S of the square output images.
      batch_size: the global batch; each host gets batch_size // shard_count rows of it.
      seed: shuffle and augmentation seed (non-negative).
      augment: views_lib.AugmentConfig, or None for the deterministic evaluation view.
      num_epochs: passes over `indices`; None repeats forever. Each epoch has
        n // batch_size batches (the remainder is dropped).
      shard_index, shard_count: this host and the number of hosts; default
        jax.process_index() and jax.process_count().
      num_workers: grain worker processes (grain.MultiprocessingOptions); 0 reads in-process.
      num_threads: reader threads per process (grain.ReadOptions), each building whole batches.
      prefetch: batches buffered ahead per process (and per worker).
      augment_on: "device" (uint8 pixels + drawn views, rendered in the step) or "host"
        (float32 images rendered here with PIL); the views are the same either way.
      stored_shape: [H, W] of the shipped pixels (device); default the first image's shape.

    Returns:
      grain.IterDataset of host-local batch dicts; `iter()` of it is checkpointable.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    views_lib.check_augment_on(augment_on)
    rows, row_labels = check_rows(source, indices, labels)
    shard_index, shard_count, host_batch = host_shard(batch_size, shard_index, shard_count)
    positions, steps_per_epoch = shuffled_position_batches(len(rows), batch_size, seed, num_epochs)
    host_slice = slice(shard_index * host_batch, (shard_index + 1) * host_batch)
    ds = positions.map_with_index(_TrainBatch(
        source, rows, row_labels, image_size=image_size, augment=augment, seed=seed,
        steps_per_epoch=steps_per_epoch, host_slice=host_slice, augment_on=augment_on,
        stored_shape=views_lib.stored_shape_of(source, rows, stored_shape)))
    return to_iter_dataset(ds, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


def shuffled_position_batches(num_rows: int, batch_size: int, seed: int,
                              num_epochs: int | None) -> tuple[grain.MapDataset, int]:
    """The training order: per epoch a seeded shuffle of positions 0..num_rows-1, the incomplete
    last batch dropped; returns (MapDataset of [B] position batches, steps per epoch).

    Shared by the online pipeline and the cached-teacher replay (`rosjax.distill.cache`), so
    both see the same batches for the same seed.
    """
    steps_per_epoch = num_rows // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_rows} examples make no full batch of {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    shuffle_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    positions = (grain.MapDataset.range(num_rows)
                 .shuffle(seed=shuffle_seed)  # reseeded per epoch by repeat
                 .slice(slice(0, steps_per_epoch * batch_size))  # drop the remainder
                 .repeat(num_epochs)
                 .batch(batch_size, drop_remainder=True))  # [B] positions into rows
    return positions, steps_per_epoch


def to_iter_dataset(ds: grain.MapDataset, *, num_threads: int, prefetch: int,
                    num_workers: int) -> grain.IterDataset:
    """Batches read by `num_threads` threads per process, in `num_workers` worker processes
    (0: in-process), `prefetch` batches ahead."""
    ds = ds.to_iter_dataset(_read_options(num_threads, prefetch))
    if num_workers > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=prefetch))
    return ds


def train_iterator(source, indices, labels, **kwargs) -> grain.DatasetIterator:
    """`iter(train_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
    return iter(train_dataset(source, indices, labels, **kwargs))


def eval_batches(source, indices, labels, *, image_size: int, batch_size: int,
                 shard_index: int | None = None, shard_count: int | None = None,
                 num_threads: int = 2, prefetch: int = 2, augment_on: str = "device",
                 stored_shape: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches in `indices` order, every example exactly once.

    ceil(n / batch_size) global batches; the last is padded (image 0, label 0, index -1,
    mask False) so all batches have the same shape. Arguments as in `train_dataset`.
    """
    views_lib.check_augment_on(augment_on)
    rows, row_labels = check_rows(source, indices, labels)
    shard_index, _, host_batch = host_shard(batch_size, shard_index, shard_count)
    num_batches = -(-len(rows) // batch_size)
    channels = views_lib.checked_image(source[int(rows[0])], int(rows[0])).shape[2]
    ds = grain.MapDataset.range(num_batches).map(_EvalBatch(
        source, rows, row_labels, image_size=image_size, channels=channels,
        batch_size=batch_size, host_batch=host_batch, shard_index=shard_index,
        augment_on=augment_on, stored_shape=views_lib.stored_shape_of(source, rows, stored_shape)))
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
