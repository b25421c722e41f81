"""What the ISIC 2019 and NIH ChestX-ray14 TFDS builders share.

Both builders read their inputs from a manual directory or download them, resize every image
to one square size with PIL, and must work without TensorFlow and fail on bad input with an
error that names the file, the row or the option (never a bare trace from inside TFDS):

- `DataError` / `CorruptImageError`: the errors for missing, malformed or unreadable input.
- `read_csv`: header + rows of a CSV, any line ending, with physical line numbers for errors.
- `index_files`: one walk over a manual directory, whatever layout the user unzipped to.
- `download_first`: try the mirrors of one file in turn (TFDS `dl_manager.download`).
- `resize_to_square`: decode, convert, shorter side to `size`, centre crop, JPEG bytes.
- `ordered_map`: decode/resize on a thread pool (PIL releases the GIL) keeping input order.
- `ResizedImageBuilder`: the base builder: `skip_corrupt_images` option, manual directory
  path, TFDS's in-memory shuffle buffer lifted above 1 GiB (above it TFDS spills to bucket
  files through `tf.io.gfile`, which needs TensorFlow), and `columns()`: every non-image
  feature of all examples as arrays, read once with the images left encoded and cached in
  the dataset folder (TFDS parses about 1,000 records/s in Python: 2 minutes for NIH).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import inspect
import io
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import utils as tfds_utils

_T = TypeVar("_T")
_R = TypeVar("_R")

# In-memory shuffle limit while a split is written: 1 TiB, i.e. never spill to disk. TFDS
# holds a split's serialized examples in RAM below its own 1 GiB limit anyway; the resized
# configs are a few GiB at most (NIH at 256 px is about 1.2 GB).
_SHUFFLE_BUFFER_BYTES = 1 << 40

# Cache of `ResizedImageBuilder.columns()`, next to the TFDS files of a prepared dataset.
COLUMNS_FILE = "rosjax_columns.npz"
_READ_CHUNK = 4096

# Exceptions PIL raises for unreadable, truncated or hostile image bytes.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


class DataError(ValueError):
    """Missing, malformed or inconsistent input files; the message names the file or row."""


class CorruptImageError(DataError):
    """An image file that PIL cannot decode; the message names the file."""


@dataclasses.dataclass
class SquareImageConfig(tfds.core.BuilderConfig):
    """A builder config storing every image resized to `image_size` x `image_size` pixels."""

    image_size: int = 256


def square_configs(sizes: Sequence[int], description: str) -> list[SquareImageConfig]:
    """One config per size, named by the size ('32', '256', ...)."""
    return [
        SquareImageConfig(name=str(s), image_size=s,
                          description=f"{description} Images resized to {s}x{s} px "
                                      "(shorter side, then centre crop), JPEG.")
        for s in sizes
    ]


def read_csv(path: pathlib.Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Returns (header, rows) of a CSV file; each row as (line number, stripped fields).

    Accepts CRLF or LF line endings and a UTF-8 byte-order mark; drops empty trailing
    header names (a trailing comma) and skips blank lines. Line numbers count from 1 at the
    header, as an editor shows them.
    """
    f = open(path, newline="", encoding="utf-8-sig")
    reader = csv.reader(f)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise DataError(f"{path} is empty; expected a CSV file with a header row.") from None
    while header and not header[-1]:
        header.pop()

    def rows() -> Iterator[tuple[int, list[str]]]:
        with f:
            for row in reader:
                fields = [x.strip() for x in row]
                if any(fields):
                    yield reader.line_num, fields

    return header, rows()


def index_files(root: pathlib.Path | None,
                suffixes: Iterable[str]) -> dict[str, list[pathlib.Path]]:
    """Maps file name -> paths of every file under `root` whose name ends with a suffix.

    Hidden files and folders (names starting with '.') and macOS '__MACOSX' folders are
    skipped. Paths of one name are sorted shallowest first. A missing root gives {}.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, list[pathlib.Path]] = collections.defaultdict(list)
    if root is None or not root.is_dir():
        return {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found[name].append(pathlib.Path(dirpath, name))
    for paths in found.values():
        paths.sort(key=lambda p: (len(p.parts), str(p)))
    return dict(found)


def download_first(dl_manager: tfds.download.DownloadManager, filename: str,
                   urls: Sequence[str], hint: str) -> pathlib.Path:
    """Downloads `filename` from the first of `urls` that answers; DataError if none does.

    `hint` ends the error message and tells the user where to put the file instead.
    """
    failures = []
    for url in urls:
        try:
            return pathlib.Path(os.fspath(dl_manager.download(url)))
        except Exception as e:  # noqa: BLE001 - any failure moves on to the next mirror
            failures.append(f"  {url}: {type(e).__name__}: {e}")
    raise DataError(f"Could not download {filename}:\n" + "\n".join(failures) + f"\n{hint}")


def resize_to_square(data: bytes, *, name: str, mode: str, size: int, quality: int = 90) -> bytes:
    """Decodes image bytes, converts to `mode` ('RGB' or 'L'), resizes, returns JPEG bytes.

    The shorter side goes to `size` (antialiased bicubic) and the centre `size` x `size`
    square is kept. RGBA/palette/CMYK inputs are converted, so the stored channel count is
    always that of `mode`. Raises CorruptImageError naming `name` when PIL cannot decode it.
    """
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.draft(mode, (size, size))  # JPEG: decode at a reduced scale >= size (fast)
            img = img.convert(mode)
    except _PIL_ERRORS as e:
        raise CorruptImageError(f"{name} is not a readable image ({type(e).__name__}: {e})") from e
    img = PIL.ImageOps.fit(img, (size, size), method=PIL.Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


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


@contextlib.contextmanager
def _in_memory_shuffle() -> Iterator[None]:
    """Raises TFDS's in-memory shuffle limit for the duration (see the module docstring)."""
    old = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = max(old, _SHUFFLE_BUFFER_BYTES)
    try:
        yield
    finally:
        tfds_shuffle.MAX_MEM_BUFFER_SIZE = old


class ResizedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the two builders: square resized-image configs read from a manual directory.

    Args (besides TFDS's `data_dir`, `config`, `version`, and `file_format`, which
    defaults to 'array_record' here):
      skip_corrupt_images: False (default) stops preparation at the first unreadable image
        with an error naming it; True leaves such images out and lists them in
        `builder.info.metadata['skipped_corrupt_images']`.
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file (where TFDS looks for an optional checksums.tsv).

        TFDS 4.9.10 computes this with the `importlib_resources` backport, which it does
        not declare as a dependency; this is its own fallback, without the backport.
        """
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_corrupt_images: bool = False, **kwargs):
        # ArrayRecord by default: random access (tfds.data_source, grain) without TensorFlow.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._skip_corrupt_images = skip_corrupt_images
        self._skipped: list[str] = []
        self._manual_root: pathlib.Path | None = None

    @property
    def manual_root(self) -> pathlib.Path:
        """The manual directory of the current preparation (may not exist)."""
        assert self._manual_root is not None, "only set during download_and_prepare"
        return self._manual_root

    def _download_and_prepare(self, dl_manager, download_config):
        # TFDS's own rule for the manual directory (`dl_manager.manual_dir` raises when the
        # directory is missing or empty, but both builders can download instead).
        self._manual_root = pathlib.Path(
            os.fspath(download_config.manual_dir or dl_manager.download_dir / "manual"))
        self._skipped = []
        self.info.metadata["skipped_corrupt_images"] = self._skipped
        with _in_memory_shuffle():
            super()._download_and_prepare(dl_manager, download_config)
        self._skipped.sort()
        self.info.metadata["num_skipped_corrupt_images"] = len(self._skipped)

    def _post_download_and_prepare_hook(self) -> None:
        self.columns()  # written now, so a read-only copy of the data dir has it too

    def columns(self) -> dict[str, np.ndarray]:
        """Every non-image feature of the 'train' split as an array [N, ...], in stored order.

        Text features become str arrays. Read with the images left encoded (no image is
        decoded) and cached in COLUMNS_FILE; a read-only data dir only skips the cache.
        """
        path = pathlib.Path(os.fspath(self.data_path)) / COLUMNS_FILE
        n = self.info.splits["train"].num_examples
        if path.exists():
            with np.load(path, allow_pickle=False) as f:
                columns = dict(f)
            if all(len(v) == n for v in columns.values()):
                return columns
        raw = self.as_data_source(split="train",
                                  decoders={"image": tfds.decode.SkipDecoding()})
        rows: list[dict] = []
        for start in range(0, n, _READ_CHUNK):
            rows.extend(raw.__getitems__(list(range(start, min(start + _READ_CHUNK, n)))))
        columns = {}
        for key in self.info.features.keys():
            if key == "image":
                continue
            values = [r[key] for r in rows]
            if values and isinstance(values[0], bytes):
                columns[key] = np.array([v.decode("utf-8") for v in values], dtype=str)
            else:
                columns[key] = np.array(values)
        tmp = path.with_name(f"{COLUMNS_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **columns)
            os.replace(tmp, path)  # atomic: concurrent readers see all or nothing
        except OSError:
            tmp.unlink(missing_ok=True)
        return columns

    def _resize_or_skip(self, data: bytes, name: str, mode: str) -> bytes | None:
        """Resized JPEG bytes, or None for an unreadable image when skipping is enabled."""
        try:
            return resize_to_square(data, name=name, mode=mode,
                                    size=self.builder_config.image_size)
        except CorruptImageError as e:
            if not self._skip_corrupt_images:
                raise CorruptImageError(
                    f"{e}. Replace the file, or pass skip_corrupt_images=True to leave "
                    "unreadable images out (they are listed in the dataset's "
                    "metadata.json).") from e
            self._skipped.append(name)
            return None
