"""Varied synthetic images for generated sample sets: the class drawn with realistic variation.

The bundled samples (difficulty 0, drawn in rosjax.data.make_samples) show each class as one
colour and one shape at a near-fixed place and size, so any model separates them: a method
comparison on them measures nothing. These drawings add, scaled by `difficulty` in (0, 1]:

  ISIC: a skin tone drawn from a wide range with an illumination gradient; lesion position,
  size, elongation, rotation and an irregular border (low-order harmonics of the radius);
  lesion colour pulled toward a confusable partner class (MEL/NV, BCC/AK, DF/VASC, BKL/SCC:
  overlapping colour distributions, so the shape must be read too); dark hair strands;
  pixel noise, then a Gaussian blur.
  NIH: the lungs' size and brightness, each finding's disc jittered in place, radius and
  contrast; pixel noise and blur.

The class stays visible at 32 px (shape and colour together decide it); what changes is that
a nearest-mean rule on the mean colour no longer does (tests/test_builders.py measures both).
Every draw comes from the caller's numpy Generator.
"""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import PIL.ImageFilter

# Each ISIC class's partner: the class whose lesion colour it is pulled toward.
ISIC_PARTNER = {"MEL": "NV", "NV": "MEL", "BCC": "AK", "AK": "BCC",
                "DF": "VASC", "VASC": "DF", "BKL": "SCC", "SCC": "BKL"}
_SKIN_TONES = np.array([[240, 200, 175], [225, 180, 150], [200, 150, 115], [165, 115, 85]], float)


def _blurred(pil: PIL.Image.Image, blur: float) -> PIL.Image.Image:
    """`pil` blurred by a Gaussian of `blur` px (unchanged at 0)."""
    return pil.filter(PIL.ImageFilter.GaussianBlur(blur)) if blur > 0 else pil


def isic_image(rng: np.random.Generator, looks: dict, label: str, size: tuple[int, int],
               difficulty: float) -> bytes:
    """A JPEG of a `label` lesion (looks[label] = (RGB colour, shape)) on varied skin."""
    w, h = size
    d = difficulty
    yy, xx = np.mgrid[:h, :w]
    m = min(w, h)
    # Skin: a tone between two neighbouring reference tones, brightness gradient.  [H, W, 3]
    k = rng.uniform(0, len(_SKIN_TONES) - 1) * d + (1 - d) * 1.0
    lo = int(min(np.floor(k), len(_SKIN_TONES) - 2))
    skin = _SKIN_TONES[lo] + (k - lo) * (_SKIN_TONES[lo + 1] - _SKIN_TONES[lo]) + rng.normal(0, 10, 3)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)) / m  # [H, W], ~[-0.7, 0.7]
    img = skin * (1 + 0.35 * d * gradient)[..., None] + rng.normal(0, 6 + 8 * d, (h, w, 3))

    colour, shape = looks[label]
    partner = np.array(looks[ISIC_PARTNER[label]][0], float)
    colour = np.array(colour, float)
    colour = colour + 0.55 * d * rng.uniform(0, 1) * (partner - colour) + rng.normal(0, 18 * d, 3)
    # Lesion geometry: centre, radius, elongation + rotation, irregular border.
    cy = h / 2 + rng.uniform(-1, 1) * (0.08 + 0.12 * d) * m
    cx = w / 2 + rng.uniform(-1, 1) * (0.08 + 0.12 * d) * m
    r = rng.uniform(0.22 - 0.05 * d, 0.32 + 0.04 * d) * m
    theta = rng.uniform(0, np.pi)
    stretch = 1 + rng.uniform(0, 0.35 * d)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    u, v = u / stretch, v * stretch
    phi = np.arctan2(v, u)
    border = 1 + 0.12 * d * sum(rng.normal() * np.cos(j * phi + rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5))
    dist = np.hypot(u, v) / border  # [H, W]
    mask = {"disk": dist < r, "ring": (dist < r) & (dist > 0.5 * r),
            "square": np.maximum(abs(u), abs(v)) / border < 0.85 * r}[shape]
    img[mask] = colour + rng.normal(0, 10 + 6 * d, (mask.sum(), 3))
    # Hair: a few dark straight strands across the image.
    for _ in range(rng.poisson(2.5 * d)):
        a, b = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * m
        line = np.abs((xx - w / 2) * np.sin(a) - (yy - h / 2) * np.cos(a) - b) < 0.6
        img[line] = img[line] * 0.35
    pil = _blurred(PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), rng.uniform(0, 1.0 * d))
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=85)
    return out.getvalue()


def nih_image(rng: np.random.Generator, cells: list[int], difficulty: float) -> PIL.Image.Image:
    """A 64x64 grey chest-like image, one disc per finding in cell k of a 4x4 grid (16-px cells)."""
    d = difficulty
    yy, xx = np.mgrid[:64, :64]
    img = 70 + rng.uniform(-15, 15) * d + 50 * np.exp(-((xx - 32) / 9.0) ** 2)  # [64, 64]
    lung_w, lung_h = 12 * (1 + rng.uniform(-0.15, 0.15) * d), 22 * (1 + rng.uniform(-0.15, 0.15) * d)
    for cx in (18, 46):
        img -= 35 * (((xx - cx) / lung_w) ** 2 + ((yy - 34) / lung_h) ** 2 < 1)
    img = img + rng.normal(0, 4 + 8 * d, img.shape)
    for k in cells:
        jitter = 2 + 2 * d
        cy, cx = 8 + 16 * (k // 4) + rng.uniform(-jitter, jitter), 8 + 16 * (k % 4) + rng.uniform(-jitter, jitter)
        disc = np.hypot(yy - cy, xx - cx) < rng.uniform(5 - 1.5 * d, 5 + 0.5 * d)
        img[disc] = 235 - rng.uniform(0, 80) * d
    return _blurred(PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L"), rng.uniform(0, 0.8 * d))
