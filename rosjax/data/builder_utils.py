"""The base of the TFDS builders (ISIC 2019, NIH ChestX-ray14, csv_images).

Every builder reads its inputs from a manual directory or downloads them
(`rosjax.data.input_files`, `rosjax.data.downloads`), resizes every image to one square size
with PIL (`rosjax.data.resizing`), and must work without TensorFlow. What they share here:

- `SquareImageConfig` / `square_configs`: one builder config per stored image side.
- `ResizedImageBuilder`: the base builder: `skip_corrupt_images` option, manual directory
  path, TFDS's in-memory shuffle buffer lifted above 1 GiB (above it TFDS spills to bucket
  files through `tf.io.gfile`, which needs TensorFlow), and `columns()`: every non-image
  feature of all examples as arrays, read once with the images left encoded and cached in
  the dataset folder (TFDS parses about 1,000 records/s in Python: 2 minutes for NIH).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import utils as tfds_utils

from rosjax import atomic
from rosjax.data.errors import CorruptImageError, DataError
from rosjax.data.resizing import resize_to_square

# The CLI option that leaves unreadable images out (named in the corrupt-image error).
SKIP_CORRUPT_OPTION = "--data.skip_corrupt_images=true"

# In-memory shuffle limit while a split is written: 1 TiB, i.e. never spill to disk. TFDS
# holds a split's serialized examples in RAM below its own 1 GiB limit anyway; the resized
# configs are a few GiB at most (NIH at 256 px is about 1.2 GB).
_SHUFFLE_BUFFER_BYTES = 1 << 40

# Cache of `ResizedImageBuilder.columns()`, next to the TFDS files of a prepared dataset.
COLUMNS_FILE = "rosjax_columns.npz"
_READ_CHUNK = 4096


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
      allow_download: True (default) downloads public input files missing from the manual
        directory; False fails at once with a DataError naming every missing file and the
        manual directory to put it in (the CLI's --data.download=never).
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file (where TFDS looks for an optional checksums.tsv).

        TFDS 4.9.10 computes this with the `importlib_resources` backport, which it does
        not declare as a dependency; this is its own fallback, without the backport.
        """
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_corrupt_images: bool = False, allow_download: bool = True,
                 **kwargs):
        # ArrayRecord by default: random access (tfds.data_source, grain) without TensorFlow.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._skip_corrupt_images = skip_corrupt_images
        self._allow_download = allow_download
        self._skipped: list[str] = []
        self._manual_root: pathlib.Path | None = None

    def missing_inputs_error(self, missing: Sequence[str], note: str = "") -> DataError:
        """The --data.download=never error: each missing file and where to put it."""
        root = self.manual_root
        return DataError(
            f"{self.name}: input files are missing from the manual directory {root} and "
            "downloads are off (--data.download=never):\n"
            + "\n".join(f"  {root / name}" for name in missing) + (f"\n  {note}" if note else "")
            + "\nPut them there (any sub-folder works), pass --data.manual_dir=<folder "
            "holding them>, or allow downloading with --data.download=auto.")

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
        buffer = io.BytesIO()
        np.savez(buffer, **columns)
        with contextlib.suppress(OSError):  # a read-only data dir: no cache
            atomic.write_bytes(path, buffer.getvalue())  # concurrent readers see all or nothing
        return columns

    def _resize_or_skip(self, data: bytes, name: str, mode: str) -> bytes | None:
        """Resized JPEG bytes, or None for an unreadable image when skipping is enabled."""
        try:
            return resize_to_square(data, name=name, mode=mode,
                                    size=self.builder_config.image_size)
        except CorruptImageError as e:
            if not self._skip_corrupt_images:
                raise CorruptImageError(
                    f"{e}. Replace the file, or leave unreadable images out with the "
                    f"option {SKIP_CORRUPT_OPTION} (prepare(..., skip_corrupt_images=True)); "
                    "they are then listed in the dataset's metadata.json.") from e
            self._skipped.append(name)
            return None
