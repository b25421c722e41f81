"""What the ISIC 2019 and NIH ChestX-ray14 TFDS builders share.

Both builders read their inputs from a manual directory or download them, resize every image
to one square size with PIL, and must work without TensorFlow and fail on bad input with an
error that names the file, the row or the option (never a bare trace from inside TFDS):

- `DataError` / `CorruptImageError`: the errors for missing, malformed or unreadable input.
- `read_csv`: header + rows of a CSV, any line ending, UTF-8 (with or without BOM), UTF-16
  with BOM or cp1252, with physical line numbers for errors.
- `UnknownValues`: maps categorical values outside a known set to unknown, counted and logged.
- `read_zip_member` / `check_member_size`: archive members above MAX_MEMBER_BYTES are refused
  before they are read.
- `index_files`: one walk over a manual directory, whatever layout the user unzipped to.
- `download_first`: try the mirrors of one file in turn (TFDS `dl_manager.download`), after
  a cheap connection check per host, with TFDS's HTTP retries lowered (`few_download_retries`)
  so that an offline machine fails in seconds, not minutes.
- `resize_to_square`: decode, convert (16-bit greyscale scaled to 8 bits), shorter side to
  `size`, centre crop, JPEG bytes.
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
import logging
import os
import pathlib
import socket
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import downloader as tfds_downloader

from rosjax import atomic
from rosjax.errors import UserError

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

# The largest uncompressed archive member read (an image of either dataset is a few MB at
# most): a larger one is refused, by its declared size, before it is read.
MAX_MEMBER_BYTES = 64 << 20
# HTTP retries of one download (TFDS: 10, with exponential backoff, i.e. about 200 s per
# unreachable URL) and the timeout of the connection check before it.
DOWNLOAD_RETRIES = 2
CONNECT_TIMEOUT_S = 5.0
# The CLI option that leaves unreadable images out (named in the corrupt-image error).
SKIP_CORRUPT_OPTION = "--data.skip_corrupt_images=true"

# In-memory shuffle limit while a split is written: 1 TiB, i.e. never spill to disk. TFDS
# holds a split's serialized examples in RAM below its own 1 GiB limit anyway; the resized
# configs are a few GiB at most (NIH at 256 px is about 1.2 GB).
_SHUFFLE_BUFFER_BYTES = 1 << 40

# Cache of `ResizedImageBuilder.columns()`, next to the TFDS files of a prepared dataset.
COLUMNS_FILE = "rosjax_columns.npz"
_READ_CHUNK = 4096

# Exceptions PIL raises for unreadable, truncated or hostile image bytes.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


class DataError(UserError, ValueError):
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

    Accepts CRLF or LF line endings; drops empty trailing header names (a trailing comma)
    and skips blank lines. Line numbers count from 1 at the header, as an editor shows them.
    The text is decoded by `decode_text` (UTF-8 with or without BOM, UTF-16 with BOM, else
    cp1252); undecodable or binary content is a DataError naming the file and line.
    """
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}).") from e
    reader = csv.reader(io.StringIO(decode_text(raw, path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path} is empty; expected a CSV file with a header row.") from None
    except csv.Error as e:
        raise DataError(f"{path} line 1 is not valid CSV ({e}).") from None
    while header and not header[-1]:
        header.pop()

    def rows() -> Iterator[tuple[int, list[str]]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path} line {reader.line_num} is not valid CSV ({e}).") from None
            fields = [x.strip() for x in row]
            if any(fields):
                yield reader.line_num, fields

    return header, rows()


def decode_text(raw: bytes, path: pathlib.Path | str) -> str:
    """The text of a CSV/list file: UTF-16 with BOM, UTF-8 (BOM optional), else cp1252.

    Spreadsheet programs save CSVs as UTF-16 ("Unicode text") or in the Windows code page;
    cp1252 is tried last (logged) and bytes it does not define, or NUL bytes in a file
    without UTF-16 BOM (a binary file), are a DataError naming the file and line.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} starts with a UTF-16 byte-order mark but is not valid "
                            f"UTF-16 ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path} line {line} holds NUL bytes: a binary file, not a text/CSV "
                        "file (save it as UTF-8 CSV).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: byte 0x{raw[e.start]:02x} is neither UTF-8 nor cp1252 text "
            f"(UTF-8: {utf8_error.reason} at byte {utf8_error.start}); save the file as UTF-8."
        ) from None
    line = raw[:utf8_error.start].count(b"\n") + 1
    log.warning("%s is not UTF-8 (line %d: %s); read as cp1252 (Windows) text.", path, line,
                utf8_error.reason)
    return text


class UnknownValues:
    """Maps categorical values outside a known set to an unknown value, counted and logged.

    `get(value, line)` returns the canonical spelling of `value` (matched ignoring case and
    surrounding spaces) or `unknown`; `log()` warns once per file and column with the count
    and the first lines. The empty string always means unknown.
    """

    def __init__(self, path: pathlib.Path | str, column: str, known: Iterable[str],
                 unknown: str = ""):
        self.path, self.column, self.unknown = path, column, unknown
        self._known = {k.lower(): k for k in known}
        self.lines: list[tuple[int, str]] = []

    def get(self, value: str, line: int) -> str:
        value = value.strip()
        if not value:
            return self.unknown
        canonical = self._known.get(value.lower())
        if canonical is None:
            self.lines.append((line, value))
            return self.unknown
        return canonical

    def log(self) -> None:
        if self.lines:
            examples = ", ".join(f"line {n}: {v!r}" for n, v in self.lines[:5])
            log.warning("%s: %d rows have %s values outside %s (%s); stored as unknown %r.",
                        self.path, len(self.lines), self.column, sorted(self._known.values()),
                        examples, self.unknown)


def check_member_size(archive: pathlib.Path | str, member: str, size: int) -> None:
    """DataError naming archive and member when `size` (uncompressed) is above the cap."""
    if size > MAX_MEMBER_BYTES:
        raise DataError(
            f"{archive}: member {member} is {size:,} bytes uncompressed, above the "
            f"{MAX_MEMBER_BYTES:,}-byte limit on one image file; the archive is not the "
            "dataset's (or is damaged): replace it with the original download.")


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                    archive: pathlib.Path | str) -> bytes:
    """The bytes of one zip member, refused (DataError) above MAX_MEMBER_BYTES.

    Checked first by the declared size, then while reading (a forged header cannot make it
    decompress more than the cap + 1 bytes).
    """
    check_member_size(archive, info.filename, info.file_size)
    with zf.open(info) as f:
        data = f.read(MAX_MEMBER_BYTES + 1)
    check_member_size(archive, info.filename, len(data))
    return data


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

    `hint` ends the error message and tells the user where to put the file instead. A host
    that does not accept a connection within CONNECT_TIMEOUT_S is skipped without a
    download attempt (offline machines fail in seconds).
    """
    failures = []
    for url in urls:
        reason = unreachable(url)
        if reason is not None:
            failures.append(f"  {url}: {reason}")
            continue
        try:
            with few_download_retries():
                return pathlib.Path(os.fspath(dl_manager.download(url)))
        except Exception as e:  # noqa: BLE001 - any failure moves on to the next mirror
            failures.append(f"  {url}: {type(e).__name__}: {e}")
    raise DataError(f"Could not download {filename}:\n" + "\n".join(failures) + f"\n{hint}")


def unreachable(url: str, timeout: float | None = None) -> str | None:
    """None when the host of `url` accepts a TCP connection, else why not (one line)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port),
                                      timeout=CONNECT_TIMEOUT_S if timeout is None else timeout):
            return None
    except OSError as e:
        return f"host {parts.hostname}:{port} unreachable ({type(e).__name__}: {e}; offline?)"


@contextlib.contextmanager
def few_download_retries() -> Iterator[None]:
    """Lowers TFDS's HTTP retries per URL to DOWNLOAD_RETRIES for the duration."""
    old = tfds_downloader.MAX_RETRIES
    tfds_downloader.MAX_RETRIES = min(old, DOWNLOAD_RETRIES)
    try:
        yield
    finally:
        tfds_downloader.MAX_RETRIES = old


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
