"""``RUN/run.json``: the bundle and settings a run was trained with, read back as data.

``medssl pretrain`` writes it; ``--resume``, ``embed``, ``evaluate`` and ``attention`` read it to
rebuild the same encoder. Run folders are shared between people, and MONAI's parser runs
``$`` expressions, follows ``@`` references and instantiates ``_target_`` mappings, so a record
is accepted only when every setting is a plain value for a key the bundle defines: opening a
shared run folder never runs the sender's code (the checkpoints load with ``weights_only=True``
for the same reason).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_run_record", "checkpoint_record", "TRAINING_ONLY"]

# Settings of the training run that do not describe the encoder (a later command chooses its own).
TRAINING_ONLY = ("dataset_dir", "max_epochs", "batch_size", "seed")


def read_run_record(path: str | os.PathLike) -> tuple[str, dict]:
    """``(bundle, settings)`` of a ``run.json``; ``ValueError`` naming the file for anything that is not plain data."""
    from .bundle_settings import check_known, check_plain, config_settings
    from .bundles import bundle_config

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable run record ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("bundle"), str) or not isinstance(record.get("overrides", {}), dict):
        raise ValueError(f"{path} is not a run record: expected {{\"bundle\": NAME, \"overrides\": {{...}}}}")
    bundle, settings = record["bundle"], record.get("overrides", {})
    if os.sep in bundle or bundle.startswith("."):
        from .bundles import list_bundles

        if Path(bundle).name not in list_bundles():
            raise ValueError(f"{path}: bundle {bundle!r} is a path; a run record names one of medssl's bundles")
        bundle = Path(bundle).name
    check_plain(settings, str(path))
    check_known(settings, *config_settings(bundle_config(bundle)), where=str(path))
    return bundle, settings


def checkpoint_record(ckpt: str | os.PathLike, bundle: str | None = None, config: str = "train") -> tuple[str, dict]:
    """The bundle and encoder settings a checkpoint was trained with (``RUN/run.json`` beside ``RUN/models/``).

    Only settings that ``config`` of the bundle defines are returned (training-only settings such
    as the mask ratio do not exist in an inference config).
    """
    from .bundle_settings import config_settings
    from .bundles import bundle_config

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    record = ckpt.parent.parent / "run.json"
    saved_bundle, saved = read_run_record(record) if record.exists() else (None, {})
    bundle = bundle or saved_bundle
    if bundle is None:
        raise ValueError(f"no {record} next to the checkpoint (written by `medssl pretrain`); say which bundle made it with --bundle")
    known, _ = config_settings(bundle_config(bundle, config))
    return bundle, {k: v for k, v in saved.items() if k not in TRAINING_ONLY and k.split("#")[0] in known}
