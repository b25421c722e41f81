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

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from rosjax.data import device_augment

EVAL_CROP_FRACTION = 0.875  # centre crop covers 87.5% of the resized shorter side
AUGMENT_ON = ("device", "host")  # where views are rendered: in the jitted step, or here with PIL
_LUMA = np.array(device_augment.LUMA, np.float32)  # ITU-R 601 grey, as PIL's convert('L')


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation, applied per example in this order.

    Attributes:
      crop_scale: random resized crop: the crop's area as a fraction of the image, drawn
        uniformly from this range (torchvision RandomResizedCrop; 10 tries, then a centre crop).
      crop_ratio: the crop's width/height, drawn log-uniformly from this range.
      horizontal_flip: mirror left-right with probability 1/2.
      vertical_flip: mirror top-bottom with probability 1/2.
      rotation_degrees: rotate by an angle drawn uniformly from [-d, d] (bilinear, black
        corners); 0 disables it.
      brightness: multiply pixels by a factor from [1 - b, 1 + b].
      contrast: blend with the image's mean grey level by a factor from [1 - c, 1 + c].
      saturation: blend with the pixel's grey value by a factor from [1 - s, 1 + s]; no effect
        on one-channel images.
    """
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation_degrees: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"AugmentConfig.crop_scale must satisfy 0 < lo <= hi <= 1, got "
                             f"{self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"AugmentConfig.crop_ratio must satisfy 0 < lo <= hi, got "
                             f"{self.crop_ratio}")
        for name in ("rotation_degrees", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def dermoscopy(cls) -> AugmentConfig:
        """Skin-lesion photographs have no up/down or left/right: flip both ways, rotate up to
        30 degrees, crop 35-100% of the lesion image, and jitter colour by 20% to cover camera
        and lighting differences between the ISIC centres."""
        return cls(crop_scale=(0.35, 1.0), horizontal_flip=True, vertical_flip=True,
                   rotation_degrees=30.0, brightness=0.2, contrast=0.2, saturation=0.2)

    @classmethod
    def chest_xray(cls) -> AugmentConfig:
        """Chest X-rays are taken upright and in grey: no vertical flip and no saturation;
        horizontal flip as CheXNet does, mild crops (70-100%), rotation up to 10 degrees and
        10% brightness/contrast for exposure differences."""
        return cls(crop_scale=(0.7, 1.0), horizontal_flip=True, vertical_flip=False,
                   rotation_degrees=10.0, brightness=0.1, contrast=0.1, saturation=0.0)


# ----------------------------------------------------------------------------- images


def checked_image(record: Mapping[str, Any], row: int) -> np.ndarray:
    """Returns the record's image as uint8 [H, W, C] with C in (1, 3), or raises naming the row."""
    if "image" not in record:
        raise ValueError(f"source[{row}] has no 'image' (keys: {sorted(record)})")
    image = np.asarray(record["image"])
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"source[{row}]['image'] must be uint8 [H, W, 1 or 3], got "
                         f"{image.dtype} {image.shape}")
    return image


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _to_float(pil: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> float32 [S, S, C] in [0, 1]."""
    array = np.asarray(pil, np.float32) * np.float32(1 / 255)
    return array.reshape(array.shape[0], array.shape[1], channels)


def center_view(height: int, width: int, image_size: int) -> AugmentView:
    """Evaluation view of a [height, width] image: shorter side to image_size / 0.875, centre
    crop image_size, as one box (in fractional source pixels) resampled to the output side."""
    resized_short_side = round(image_size / EVAL_CROP_FRACTION)
    side = min(height, width) * image_size / resized_short_side  # crop side in source pixels
    return AugmentView(box=((width - side) / 2, (height - side) / 2, (width + side) / 2,
                            (height + side) / 2))


def center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """Evaluation view rendered on the host (`center_view`, one bilinear resample).

    image: uint8 [H, W, C]; returns float32 [image_size, image_size, C] in [0, 1].
    """
    return apply_view(image, center_view(*image.shape[:2], image_size), image_size)


def _random_crop_box(height: int, width: int, config: AugmentConfig,
                     rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop box (left, top, right, bottom)."""
    area = height * width
    log_ratio = np.log(config.crop_ratio)
    for _ in range(10):
        target_area = area * rng.uniform(*config.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    aspect = min(max(width / height, config.crop_ratio[0]), config.crop_ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (
        round(height * aspect), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclasses.dataclass(frozen=True)
class AugmentView:
    """One drawn training augmentation, without the pixels: what `apply_view` replays.

    Cached teacher outputs (`rosjax.distill.cache`) store these records so that a later epoch
    rebuilds exactly the image the teachers saw.

    Attributes:
      box: crop (left, top, right, bottom) in source pixels, resized to the output side
        (integers for training views, fractions for the evaluation centre crop).
      horizontal_flip, vertical_flip: mirror left-right / top-bottom.
      angle: rotation in degrees, or None for no rotation.
      brightness, contrast, saturation: colour-jitter factors, or None where not applied.
    """
    box: tuple[float, float, float, float]
    horizontal_flip: bool = False
    vertical_flip: bool = False
    angle: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None


def draw_view(height: int, width: int, channels: int, config: AugmentConfig,
              rng: np.random.Generator) -> AugmentView:
    """Draws one AugmentView for an image of [height, width, channels] from `rng`.

    The draws come in the order `augment_image` has always made them (box, flips, angle,
    brightness, contrast, saturation; saturation only for 3 channels).
    """
    box = _random_crop_box(height, width, config, rng)
    horizontal = bool(config.horizontal_flip and rng.random() < 0.5)
    vertical = bool(config.vertical_flip and rng.random() < 0.5)
    angle = (float(rng.uniform(-config.rotation_degrees, config.rotation_degrees))
             if config.rotation_degrees else None)
    brightness = float(_jitter_factor(config.brightness, rng)) if config.brightness else None
    contrast = float(_jitter_factor(config.contrast, rng)) if config.contrast else None
    saturation = (float(_jitter_factor(config.saturation, rng))
                  if config.saturation and channels == 3 else None)
    return AugmentView(box=box, horizontal_flip=horizontal, vertical_flip=vertical, angle=angle,
                       brightness=brightness, contrast=contrast, saturation=saturation)


def apply_view(image: np.ndarray, view: AugmentView, image_size: int) -> np.ndarray:
    """Renders `view` of `image`: crop-resize, flips, rotation, colour jitter (in that order).

    image: uint8 [H, W, C]; returns float32 [image_size, image_size, C] in [0, 1].
    """
    height, width, channels = image.shape
    left, top, right, bottom = view.box
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"AugmentView box {view.box} does not fit an image of {height}x{width} "
                         "(the view was drawn for another image)")
    pil = _to_pil(image).resize((image_size, image_size), Image.BILINEAR, box=view.box)
    if view.horizontal_flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if view.vertical_flip:
        pil = pil.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if view.angle is not None:
        pil = pil.rotate(view.angle, resample=Image.BILINEAR)
    x = _to_float(pil, channels)  # [S, S, C]
    if view.brightness is not None:
        x = np.clip(x * np.float32(view.brightness), 0.0, 1.0)
    if view.contrast is not None:
        mean_grey = _grey(x).mean()
        x = np.clip(mean_grey + (x - mean_grey) * np.float32(view.contrast), 0.0, 1.0)
    if view.saturation is not None and channels == 3:
        grey = _grey(x)[:, :, None]  # [S, S, 1]
        x = np.clip(grey + (x - grey) * np.float32(view.saturation), 0.0, 1.0)
    return x.astype(np.float32, copy=False)


def augment_image(image: np.ndarray, image_size: int, config: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Training view: random resized crop, flips, rotation, colour jitter (see AugmentConfig).

    image: uint8 [H, W, C]; returns float32 [image_size, image_size, C] in [0, 1].
    """
    return apply_view(image, draw_view(*image.shape, config, rng), image_size)


def _jitter_factor(strength: float, rng: np.random.Generator) -> np.float32:
    return np.float32(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))


def _grey(x: np.ndarray) -> np.ndarray:
    """[S, S, C] -> [S, S] grey level (identity for one channel)."""
    return x[:, :, 0] if x.shape[2] == 1 else x @ _LUMA


# ----------------------------------------------------------------------------- shipped images


def view_params(views: Sequence[AugmentView], sizes: np.ndarray,
                image_size: int) -> device_augment.AugmentParams:
    """Drawn views -> the arrays the device renders them from ([B, ...] numpy fields).

    sizes: int [B, 2] each image's own (height, width). Steps not drawn get the identity
    (angle 0) or NaN (colour-jitter factors), as the device expects.
    """
    nan = lambda f: np.nan if f is None else f  # noqa: E731
    return device_augment.AugmentParams(
        box=np.array([v.box for v in views], np.float32).reshape(-1, 4),
        flips=np.array([(v.horizontal_flip, v.vertical_flip) for v in views], bool).reshape(-1, 2),
        angle=np.array([v.angle or 0.0 for v in views], np.float32),
        jitter=np.array([(nan(v.brightness), nan(v.contrast), nan(v.saturation)) for v in views],
                        np.float32).reshape(-1, 3),
        size=np.asarray(sizes, np.int32).reshape(-1, 2), image_size=image_size)


def image_batch(images: Sequence[np.ndarray], views: Sequence[AugmentView], rows: Sequence[int], *,
                image_size: int, channels: int, augment_on: str, stored_shape: tuple[int, int],
                batch_rows: int | None = None) -> dict[str, Any]:
    """The pixels of a batch as shipped: {'image', 'view'} (device) or {'image'} (host).

    images: uint8 [H_i, W_i, C] per example; views: one AugmentView each; rows: their source
    rows (for errors). batch_rows: pad to this many rows (evaluation's last batch) with black
    images and the centre view of a stored-size image. device: image uint8 [B, H, W, C] of
    `stored_shape`, each image top-left; host: image float32 [B, S, S, C] rendered with PIL.
    """
    count = len(images)
    batch_rows = count if batch_rows is None else batch_rows
    if augment_on == "host":
        out = np.zeros((batch_rows, image_size, image_size, channels), np.float32)
        for i, (image, view) in enumerate(zip(images, views)):
            out[i] = apply_view(image, view, image_size)
        return {"image": out}
    height, width = stored_shape
    pixels = np.zeros((batch_rows, height, width, channels), np.uint8)  # [B, H, W, C]
    sizes = np.tile(np.array([height, width]), (batch_rows, 1))        # [B, 2]
    for i, (image, row) in enumerate(zip(images, rows)):
        h, w = image.shape[:2]
        if h > height or w > width:
            raise ValueError(f"source[{row}]['image'] is {h}x{w}, larger than the stored shape "
                             f"{height}x{width} of the batch: pass stored_shape=(H, W) covering "
                             "every image")
        pixels[i, :h, :w], sizes[i] = image, (h, w)
    views = list(views) + [center_view(height, width, image_size)] * (batch_rows - count)
    return {"image": pixels, device_augment.VIEW_KEY: view_params(views, sizes, image_size)}


def check_augment_on(augment_on: str) -> None:
    """Raises ValueError unless `augment_on` is one of AUGMENT_ON."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on={augment_on!r}: expected one of {', '.join(AUGMENT_ON)}")


def stored_shape_of(source, rows: np.ndarray, stored_shape: tuple[int, int] | None) -> tuple[int, int]:
    """The [H, W] device batches are padded to: `stored_shape`, or the first row's image shape."""
    if stored_shape is not None:
        return int(stored_shape[0]), int(stored_shape[1])
    return checked_image(source[int(rows[0])], int(rows[0])).shape[:2]


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
            image = checked_image(self._source[row], row)
            if self._augment is None:
                views.append(center_view(*image.shape[:2], self._image_size))
            else:
                rng = np.random.default_rng([self._seed, epoch, row])
                views.append(draw_view(*image.shape, self._augment, rng))
            images.append(image)
        pixels = image_batch(images, views, rows.tolist(), image_size=self._image_size,
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
            images.append(checked_image(self._source[row], row))
            views.append(center_view(*images[-1].shape[:2], self._image_size))
            label[i], index[i] = self._labels[positions[i]], row
        pixels = image_batch(images, views, index.tolist(), image_size=self._image_size,
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
                  augment: AugmentConfig | None, num_epochs: int | None = None,
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
      augment: AugmentConfig, or None for the deterministic evaluation view.
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
    check_augment_on(augment_on)
    rows, row_labels = check_rows(source, indices, labels)
    shard_index, shard_count, host_batch = host_shard(batch_size, shard_index, shard_count)
    positions, steps_per_epoch = shuffled_position_batches(len(rows), batch_size, seed, num_epochs)
    host_slice = slice(shard_index * host_batch, (shard_index + 1) * host_batch)
    ds = positions.map_with_index(_TrainBatch(
        source, rows, row_labels, image_size=image_size, augment=augment, seed=seed,
        steps_per_epoch=steps_per_epoch, host_slice=host_slice, augment_on=augment_on,
        stored_shape=stored_shape_of(source, rows, stored_shape)))
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
    check_augment_on(augment_on)
    rows, row_labels = check_rows(source, indices, labels)
    shard_index, _, host_batch = host_shard(batch_size, shard_index, shard_count)
    num_batches = -(-len(rows) // batch_size)
    channels = checked_image(source[int(rows[0])], int(rows[0])).shape[2]
    ds = grain.MapDataset.range(num_batches).map(_EvalBatch(
        source, rows, row_labels, image_size=image_size, channels=channels,
        batch_size=batch_size, host_batch=host_batch, shard_index=shard_index,
        augment_on=augment_on, stored_shape=stored_shape_of(source, rows, stored_shape)))
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
