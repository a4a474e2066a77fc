"""The runs a user starts, as library functions: what ``medssl pretrain`` / ``medssl evaluate`` do,
and what ``bench/`` scripts and notebooks call.

- :func:`pretrain`: a bundle's train config into a locked run folder, its settings recorded in
  ``run.json`` (resume, overwrite, private paths, MLflow tracking);
- :func:`evaluate`: the evaluation protocol on an encoder checkpoint, built from its run record;
- :func:`parse_sets`: ``KEY=VALUE`` settings as the command line gives them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["pretrain", "evaluate", "parse_sets", "private_path", "check_dimensionality"]


def parse_sets(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> overrides; values parse as YAML (numbers, null, lists)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    from .bundle_settings import check_plain

    check_plain(out, "--set")
    return out


def check_dimensionality(bundle: str, data: str, data_dims: int) -> None:
    """A 2D archive given to a 3D bundle (or the reverse) is refused unless ``--set spatial_dims`` says so."""
    from .bundle_settings import load_config
    from .bundles import bundle_config, list_bundles

    bundle_dims = load_config(bundle_config(bundle)).get("spatial_dims")
    if bundle_dims is not None and bundle_dims != data_dims:
        same = [b for b in list_bundles() if b.endswith(f"_{data_dims}d")]
        raise ValueError(f"{data} holds {data_dims}D images but bundle {bundle} is {bundle_dims}D; choose a {data_dims}D bundle "
                         f"({', '.join(same)}) or add --set spatial_dims={data_dims} to train this recipe in {data_dims}D")


def private_path(path: str | Path) -> str:
    """What ``--private`` records instead of a path (folder names can carry patient names or MRNs)."""
    import hashlib

    return "private:" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]


def pretrain(bundle: str, out: str | Path, overrides: dict, resume: bool = False, progress: bool = True,
             overwrite: bool = False, private: bool = False, tracking: str | None = None) -> Path:
    """Run bundle ``bundle``'s train config into ``out``; records the settings in ``out/run.json``.

    The folder is locked for the run. A fresh run into a folder that holds checkpoints is refused
    unless ``resume`` (continue it) or ``overwrite`` (delete its checkpoints, pictures, logs and
    record first). ``private`` records the data folder as a hash instead of its path.
    ``tracking="mlflow"`` logs the run with MONAI's MLflow handlers (``OUT/mlruns.db``).
    ``progress=False`` hides the per-epoch bar (the epoch summary lines stay); it is not recorded.
    """
    import shutil

    from .atomic import atomic_write
    from .bundles import run_bundle
    from .engine.checkpoint import latest_checkpoint
    from .engine.run_folder import lock_run_folder, release_run_folder
    from .run_record import read_run_record

    from .bundle_settings import check_known, config_settings
    from .bundles import bundle_config

    check_known(overrides, *config_settings(bundle_config(bundle)), where=f"bundle {bundle}")  # before anything is written
    out = Path(out).resolve()
    lock_run_folder(out)
    try:
        record = out / "run.json"
        latest = latest_checkpoint(out / "models")
        if overwrite and not resume:
            for name in ("models", "pictures", "logs"):
                shutil.rmtree(out / name, ignore_errors=True)
            record.unlink(missing_ok=True)
        elif latest is not None and not resume:
            raise ValueError(f"{out} already holds a run (checkpoint {latest.name}); add --resume to continue it, "
                             "--overwrite to start over there, or choose another --out")
        if resume and latest is None:
            print(f"medssl pretrain: --resume: no checkpoint in {out / 'models'} yet, starting from scratch", file=sys.stderr)
        if resume and record.exists():  # resuming: the recorded settings win, new flags (e.g. more epochs) on top
            saved_bundle, saved = read_run_record(record)
            if saved_bundle != bundle:
                raise ValueError(f"{out} was pretrained with bundle {saved_bundle!r}, not {bundle!r}")
            if str(saved.get("dataset_dir", "")).startswith("private:") and "dataset_dir" not in overrides:
                raise ValueError(f"{record} records its data privately; give --data again to resume")
            overrides = {**saved, **overrides}
        recorded = dict(overrides)
        if private and "dataset_dir" in recorded:
            recorded["dataset_dir"] = private_path(recorded["dataset_dir"])
        with atomic_write(record, "w") as f:
            f.write(json.dumps({"bundle": bundle, "overrides": recorded}, indent=2) + "\n")
        run_bundle(bundle, "train", {**overrides, "output_dir": str(out), "resume": resume, "progress": progress},
                   tracking=tracking)
    finally:
        release_run_folder(out)
    return out


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, bundle: str | None = None, plan=None,
             progress: bool = True, private: bool = False) -> list[Path]:
    """Evaluate an encoder checkpoint on labelled ``data`` (see :mod:`medssl.eval.protocol`); returns the report files.

    ``private`` records the data and checkpoint paths in the reports as hashes.
    """
    from .bundles import bundle_parser
    from .eval.protocol import evaluate_checkpoint
    from .run_record import checkpoint_record

    ckpt = Path(checkpoint).resolve()
    name, settings = checkpoint_record(ckpt, bundle)
    get = bundle_parser(name, settings).get_parsed_content
    recorded = {"checkpoint": private_path(ckpt) if private else str(ckpt),
                "data": private_path(data) if private else str(Path(data).resolve()), "bundle": name}
    return evaluate_checkpoint(lambda: get("network_def", lazy=False), ckpt, data, out, spatial_dims=get("spatial_dims"),
                               size=get("image_size"), channels=get("in_channels"), ct_window=get("ct_window"), plan=plan,
                               progress=progress, recorded=recorded,
                               title=f"{name} on {'private data' if private else Path(data).name}")
