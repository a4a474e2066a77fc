"""Embeddings as a MONAI evaluator: an inferer that pools (and tiles 3D volumes), a handler that writes the ``.npz``.

The inference bundles run ``SupervisedEvaluator(network, inferer=EmbeddingInferer, val_handlers=[EmbeddingWriter])``
as model-zoo inference bundles do, so MONAI's workflow checks find the ``evaluator`` and ``inferer``
they expect and users can add their own handlers. :func:`write_embeddings` builds the same evaluator
from Python.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.inferers import Inferer

from ..atomic import atomic_write
from .features import embed_image, load_encoder

__all__ = ["EmbeddingInferer", "EmbeddingWriter", "LoadEncoder", "embedding_evaluator", "write_embeddings", "still_to_embed", "EmbeddingProgress",
           "read_parts", "write_table"]

logger = logging.getLogger(__name__)


class EmbeddingInferer(Inferer):
    """``(B, C, *spatial)`` images -> ``(B, F)`` embeddings with ``pooling``; 3D images larger than ``tile`` are tiled."""

    def __init__(self, pooling: str = "mean", tile: int | Sequence[int] | None = None) -> None:
        self.pooling, self.tile = pooling, tile

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        tile = self.tile if inputs.ndim == 5 else None  # 2D images are embedded whole
        return torch.stack([embed_image(network, img, self.pooling, tile).float() for img in inputs])


class LoadEncoder:
    """Load encoder weights into ``network`` when the evaluator starts (so building the workflow needs no weights yet)."""

    def __init__(self, checkpoint: str | os.PathLike, network: torch.nn.Module) -> None:
        self.checkpoint, self.network = checkpoint, network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: load_encoder(self.network, self.checkpoint))


class EmbeddingWriter:
    """Collect each iteration's ``pred`` with the batch's fields; write ``out_file`` (and a table) at the end.

    The ``.npz`` holds ``embeddings`` (N, F), ``id`` (a stable salted hash per image), ``split``,
    ``source``, ``patient`` (salted hashes, never names), ``label`` (-1 where unknown) and
    ``pooling``; ``table`` writes the same rows beside it as ``.csv`` or ``.parquet`` (columns
    ``id, split, label, source, patient, e0 ... e{F-1}``) for pandas / R users to join on.
    Every ``part_size`` rows are saved to ``<out_file>.parts/`` as they come, so a killed run
    resumes with :func:`still_to_embed`; the parts are merged and removed at the end. All files are
    written atomically.
    """

    def __init__(self, out_file: str | os.PathLike, pooling: str = "mean", table: str | None = "csv", part_size: int = 4096) -> None:
        if table not in (None, "none", "csv", "parquet"):
            raise ValueError(f"table must be csv, parquet or none, got {table!r}")
        self.out_file, self.pooling, self.part_size = Path(out_file), pooling, int(part_size)
        self.table = None if table in (None, "none") else table
        self._reset()

    @property
    def parts(self) -> Path:
        return parts_folder(self.out_file)

    def _reset(self, engine=None) -> None:
        self.rows: dict[str, list] = {k: [] for k in _COLUMNS}
        self.feats: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine) -> None:
        pred = engine.state.output["pred"].detach().float().cpu()
        batch, n = engine.state.batch, len(pred)
        self.feats.append(pred)
        for key, default in _COLUMNS.items():
            values = batch.get(key)
            if key == "label":
                values = [-1] * n if values is None else [int(v) for v in torch.as_tensor(values).reshape(n, -1)[:, 0]]
            self.rows[key] += [default] * n if values is None else [v if key == "label" else str(v) for v in values]
        if sum(map(len, self.feats)) >= self.part_size:
            self._save_part()

    def _save_part(self) -> None:
        if not self.feats:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        index = len(list(self.parts.glob("part_*.npz")))
        with atomic_write(self.parts / f"part_{index:06d}.npz") as f:
            np.savez(f, pooling=np.asarray(self.pooling), embeddings=torch.cat(self.feats).numpy(),
                     **{k: np.asarray(v) for k, v in self.rows.items()})
        self._reset()

    def _write(self, engine) -> None:
        self._save_part()
        done = read_parts(self.out_file, self.pooling)
        if done is None:
            raise ValueError("no images to embed")
        with atomic_write(self.out_file) as f:
            np.savez(f, pooling=np.asarray(self.pooling), **done)
        if self.table:
            write_table(done, self.out_file.with_suffix(f".{self.table}"))
        import shutil

        shutil.rmtree(self.parts, ignore_errors=True)
        splits = ", ".join(f"{s} {n}" for s, n in zip(*np.unique(done["split"], return_counts=True)))
        logger.info("wrote %s (%d embeddings of size %d; %s)%s", self.out_file, *done["embeddings"].shape, splits,
                    f" and {self.out_file.with_suffix('.' + self.table)}" if self.table else "")


_COLUMNS = {"id": "", "split": "", "label": -1, "source": "", "patient": ""}


def parts_folder(out_file: str | os.PathLike) -> Path:
    out_file = Path(out_file)
    return out_file.with_name(out_file.name + ".parts")


def read_parts(out_file: str | os.PathLike, pooling: str | None = None) -> dict | None:
    """The rows saved so far for ``out_file`` (``None`` if none); refuses parts made with another pooling."""
    files = sorted(parts_folder(out_file).glob("part_*.npz"))
    if not files:
        return None
    parts = [dict(np.load(f)) for f in files]
    if pooling is not None and any(str(p.pop("pooling")) != pooling for p in parts):
        from ..errors import UserError

        raise UserError(f"{parts_folder(out_file)} holds embeddings made with another pooling; delete it or use that pooling")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "pooling"}


def still_to_embed(entries, out_file: str | os.PathLike) -> list[dict]:
    """``entries`` without those already embedded in ``out_file``'s parts (a resumed ``medssl embed``)."""
    done = read_parts(out_file)
    if done is None:
        return list(entries)
    ids = set(done["id"].tolist())
    left = [e for e in entries if str(e.get("id", "")) not in ids]
    if not left and entries:  # killed after the last part, before the merge: embed that part again (a run needs items)
        last = sorted(parts_folder(out_file).glob("part_*.npz"))[-1]
        with np.load(last) as part:
            again = set(part["id"].tolist())
        last.unlink()
        left = [e for e in entries if str(e.get("id", "")) in again]
    logger.info("resuming %s: %d images embedded before, %d to go", out_file, len(entries) - len(left), len(left))
    return left


def write_table(rows: dict, path: str | os.PathLike) -> Path:
    """``rows`` (the ``.npz`` arrays) as a table: one row per image, its fields, then ``e0 ... e{F-1}``.

    ``.csv`` needs nothing beyond Python; ``.parquet`` needs ``pyarrow`` (``pip install pyarrow``).
    """
    emb = rows["embeddings"]
    fields = [k for k in _COLUMNS if k in rows]
    names = fields + [f"e{i}" for i in range(emb.shape[1])]
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            from ..errors import UserError

            raise UserError(f"{path}: writing .parquet needs pyarrow (pip install pyarrow); or use --table csv") from None
        table = pa.table({**{k: rows[k] for k in fields}, **{n: emb[:, i] for i, n in enumerate(names[len(fields):])}})
        with atomic_write(path) as f:
            pq.write_table(table, f)
        return path
    import csv

    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for i in range(len(emb)):
            writer.writerow([rows[k][i] for k in fields] + [f"{v:.6g}" for v in emb[i]])
    return path


class EmbeddingProgress:
    """Progress of an embedding run: ignite's bar on a terminal, else a plain line every tenth of the data."""

    def __init__(self, bar: bool = True, lines: int = 10) -> None:
        self.bar, self.lines = bar, lines

    def attach(self, engine) -> None:
        if not self.bar:
            return
        if sys.stderr.isatty():
            from ignite.handlers import ProgressBar

            ProgressBar(desc="embedding").attach(engine)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._line)

    def _line(self, engine) -> None:
        length = engine.state.epoch_length or 1
        every = max(1, length // self.lines)
        if engine.state.iteration % every == 0 or engine.state.iteration == length:
            print(f"embedding: {engine.state.iteration}/{length} batches", file=sys.stderr, flush=True)


def embedding_evaluator(network: torch.nn.Module, dataloader, out_file: str | os.PathLike, pooling: str = "mean",
                        tile: int | Sequence[int] | None = None, device: str | torch.device | None = None,
                        progress: bool = True, table: str | None = None, part_size: int = 4096):
    """The inference bundles' evaluator: ``.run()`` writes ``out_file``."""
    from monai.engines import SupervisedEvaluator

    device = torch.device(device) if device else next(network.parameters()).device
    evaluator = SupervisedEvaluator(device=device, val_data_loader=dataloader, network=network.to(device),
                                    inferer=EmbeddingInferer(pooling, tile), val_handlers=[EmbeddingWriter(out_file, pooling, table, part_size)],
                                    decollate=False)
    EmbeddingProgress(progress).attach(evaluator)
    return evaluator


def write_embeddings(network: torch.nn.Module, dataloader, out_file: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                     pooling: str = "mean", tile: int | Sequence[int] | None = None, device: str | torch.device | None = None,
                     progress: bool = True, table: str | None = None, part_size: int = 4096) -> Path:
    """Embed every image of ``dataloader`` (weights from ``checkpoint`` if given) and write an ``.npz``
    (and, with ``table``, a ``.csv`` / ``.parquet`` beside it)."""
    if checkpoint is not None:
        load_encoder(network, checkpoint)
    embedding_evaluator(network, dataloader, out_file, pooling, tile, device, progress, table, part_size).run()
    return Path(out_file)
