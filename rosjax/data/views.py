"""The views of an image: drawn on the host, rendered with PIL here or on the device.

A view is what the augmentation does to one example, drawn from `(seed, epoch, row)`: the crop
box (random resized crop), flips, rotation angle and colour-jitter factors (`AugmentView`,
`draw_view`). `apply_view` renders it with PIL and numpy (the reference, and the host path of
`--data.augment_on`); `view_params` and `image_batch` ship the stored pixels with the views as
`device_augment.AugmentParams`, for the jitted steps to render (`device_augment.render`).
Evaluation's view is the torchvision centre crop (`center_view`, `center_crop`).
`rosjax.data.pipeline` batches them with grain.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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
