"""Progress as plain lines, for output that is not a terminal (log files, batch jobs): no carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["plain_progress"]


def plain_progress(items: Iterable, total: int, desc: str, unit: str = "files", lines: int = 10) -> Iterator:
    """``items`` passed through, with a line ``desc: i/total unit (rate unit/s)`` on stderr every ``1 / lines`` of ``total``."""
    t0, every = time.perf_counter(), max(1, total // lines)
    for i, item in enumerate(items, 1):
        if i % every == 0 or i == total:  # before the item: a consumer may stop at the last one
            rate = i / max(time.perf_counter() - t0, 1e-9)
            print(f"{desc}: {i}/{total} {unit} ({rate:.0f} {unit}/s)", file=sys.stderr, flush=True)
        yield item
