"""A resumable record of an evaluation: one JSON line per finished (method, pooling, fraction, seed).

An evaluation plan with fine-tuning runs for an hour or more on a CPU. Each result is appended
(and fsynced) as soon as it exists, so a killed ``medssl evaluate`` started again with the same
``--out`` skips what is done. The first line holds what the results depend on (checkpoint, data,
plan); a journal written for anything else is refused rather than mixed in. A last line cut off
by a kill is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..atomic import atomic_write

__all__ = ["Journal", "record_key"]

logger = logging.getLogger(__name__)


def record_key(record: dict) -> tuple:
    return record["method"], record["pooling"], float(record["fraction"]), int(record["seed"])


class Journal:
    """Records already finished (``done``) and :meth:`add` for new ones; ``path=None`` keeps nothing."""

    def __init__(self, path: str | os.PathLike | None, header: dict) -> None:
        self.path = None if path is None else Path(path)
        self.header = json.loads(json.dumps(header))  # as it reads back (tuples -> lists)
        self.done: dict[tuple, dict] = {}
        if self.path is None:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            parsed = []
            for i, line in enumerate(lines):
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:
                    if i != len(lines) - 1:
                        raise ValueError(f"{self.path}: line {i + 1} is not JSON; delete the file to start over") from None
            if parsed and parsed[0].get("header") != self.header:
                raise ValueError(f"{self.path} holds results of another evaluation (checkpoint, data or plan differ); "
                                 "use another --out or delete it to start over")
            self.done = {record_key(r): r for r in parsed[1:]}
            if self.done:
                logger.info("resuming the evaluation: %d results already in %s", len(self.done), self.path)
        self._rewrite(list(self.done.values()))  # a new journal gets its header; a cut-off last line is dropped

    def _rewrite(self, records: list[dict]) -> None:
        with atomic_write(self.path, "w") as f:
            f.write("\n".join(json.dumps(x) for x in [{"header": self.header}, *records]) + "\n")

    def add(self, record: dict) -> None:
        self.done[record_key(record)] = record
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
