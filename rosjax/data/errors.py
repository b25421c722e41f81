"""The input-data errors: missing, malformed or unreadable files, each naming the file or row."""
from __future__ import annotations

from rosjax.errors import UserError


class DataError(UserError, ValueError):
    """Missing, malformed or inconsistent input files; the message names the file or row."""


class CorruptImageError(DataError):
    """An image file that PIL cannot decode; the message names the file."""
