"""Progress bars for long work (cache builds, attacks, landscapes): on a terminal only.

`bar(total, desc)` is a tqdm bar on stderr when stderr is a terminal, and a no-op otherwise,
so log files and CI output stay one line per stage.
"""
from __future__ import annotations

import sys

import tqdm


def bar(total: int, desc: str, unit: str = "batch") -> tqdm.tqdm:
    """A tqdm bar of `total` units, disabled unless stderr is a terminal; use as a context manager."""
    return tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                     disable=not sys.stderr.isatty())
