"""Reading a user's input files: CSV tables, list files, archive members, manual folders.

The builders must fail on bad input with an error that names the file, the row or the option
(never a bare trace from inside TFDS):

- `read_csv`: header + rows of a CSV, any line ending, UTF-8 (with or without BOM), UTF-16
  with BOM or cp1252 (`decode_text`), with physical line numbers for errors.
- `UnknownValues`: maps categorical values outside a known set to unknown, counted and logged.
- `read_zip_member` / `check_member_size`: archive members above MAX_MEMBER_BYTES are refused
  before they are read.
- `index_files`: one walk over a manual directory, whatever layout the user unzipped to.
"""
from __future__ import annotations

import collections
import csv
import io
import logging
import os
import pathlib
import zipfile
from collections.abc import Iterable, Iterator

from rosjax.data.errors import DataError

log = logging.getLogger(__name__)

# The largest uncompressed archive member read (an image of either dataset is a few MB at
# most): a larger one is refused, by its declared size, before it is read.
MAX_MEMBER_BYTES = 64 << 20


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
