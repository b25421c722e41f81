"""Images as the builders store them: decoded, converted, resized to a square, JPEG bytes.

- `resize_to_square`: decode, convert (16-bit greyscale scaled to 8 bits), shorter side to
  `size`, centre crop, JPEG bytes; CorruptImageError naming the file when PIL cannot decode it.
- `ordered_map`: decode/resize on a thread pool (PIL releases the GIL) keeping input order.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import PIL.Image
import PIL.ImageOps

from rosjax.data.errors import CorruptImageError

_T = TypeVar("_T")
_R = TypeVar("_R")

# Exceptions PIL raises for unreadable, truncated or hostile image bytes.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


def resize_to_square(data: bytes, *, name: str, mode: str, size: int, quality: int = 90) -> bytes:
    """Decodes image bytes, converts to `mode` ('RGB' or 'L'), resizes, returns JPEG bytes.

    The shorter side goes to `size` (antialiased bicubic) and the centre `size` x `size`
    square is kept. RGBA/palette/CMYK inputs are converted, so the stored channel count is
    always that of `mode`. 16-bit greyscale (PIL modes 'I;16*', and 32-bit 'I' read as
    16-bit values) is scaled to 8 bits, value * 255 / 65535 rounded, not clipped at 255.
    Raises CorruptImageError naming `name` when PIL cannot decode it.
    """
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.draft(mode, (size, size))  # JPEG: decode at a reduced scale >= size (fast)
            if img.mode.startswith("I"):  # 'I;16', 'I;16B', 'I;16L', 'I;16N', 'I'
                img = _sixteen_to_eight_bits(img).convert(mode)
            else:
                img = img.convert(mode)
    except _PIL_ERRORS as e:
        raise CorruptImageError(f"{name} is not a readable image ({type(e).__name__}: {e})") from e
    img = PIL.ImageOps.fit(img, (size, size), method=PIL.Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _sixteen_to_eight_bits(img: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit ('I;16*') or integer ('I', taken as 0..65535) greyscale image as mode 'L'.

    PIL's own convert('L') clips every value above 255 to white.
    """
    values = np.asarray(img).astype(np.int64)  # [H, W]
    values = np.clip(values, 0, 65535)
    return PIL.Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, window: int = 256) -> Iterator[_R]:
    """Yields fn(item) for each item in input order, computing up to `window` ahead on threads.

    Used for image decoding and resizing, which PIL runs with the GIL released.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
