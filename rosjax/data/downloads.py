"""Downloading a public input file: the mirrors in turn, failing in seconds when offline.

`download_first` tries the mirrors of one file (TFDS `dl_manager.download`), after a cheap
connection check per host (`unreachable`), with TFDS's HTTP retries lowered
(`few_download_retries`), so that an offline machine fails in seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import urllib.parse
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from rosjax.data.errors import DataError

# HTTP retries of one download (TFDS: 10, with exponential backoff, i.e. about 200 s per
# unreachable URL) and the timeout of the connection check before it.
DOWNLOAD_RETRIES = 2
CONNECT_TIMEOUT_S = 5.0


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
