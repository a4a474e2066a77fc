"""Finding, checking and running medssl's MONAI Bundles from Python (the CLI's back end)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["bundle_root", "bundle_config", "list_bundles", "check_metadata", "run_bundle", "data_overrides", "bundle_parser", "REQUIRED_METADATA",
           "REQUIRED_TENSOR_KEYS"]

# The mandatory keys of the MONAI Bundle specification (docs.monai.io, mb_specification) and of the model zoo's
# schema (schema, name, changelog; required_packages_version, which MONAI >= 1.4 reads in place of the deprecated
# optional_packages_version: a file with both loses one when MONAI renames it).
REQUIRED_METADATA = ("schema", "version", "changelog", "name", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright", "network_data_format")
REQUIRED_TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def")


def _search_path() -> list[Path]:
    paths = [Path(p) for p in os.environ.get("MEDSSL_BUNDLES", "").split(os.pathsep) if p]
    return paths + [Path(__file__).resolve().parents[1] / "bundles"]


def list_bundles() -> list[str]:
    """Names of the bundles found on the search path (``$MEDSSL_BUNDLES``, then the repository's ``bundles/``)."""
    return sorted({p.name for root in _search_path() if root.is_dir() for p in root.iterdir() if (p / "configs").is_dir()})


def bundle_root(name: str | os.PathLike) -> Path:
    """The folder of bundle ``name`` (a bundle name or a path to a bundle folder)."""
    path = Path(name)
    if (path / "configs").is_dir():
        return path.resolve()
    for root in _search_path():
        if (root / str(name) / "configs").is_dir():
            return (root / str(name)).resolve()
    raise FileNotFoundError(f"no bundle named {name!r}; available: {', '.join(list_bundles()) or 'none'} "
                            "(or give the path of a bundle folder)")


def check_metadata(meta: Mapping) -> list[str]:
    """Problems with a bundle's ``metadata.json`` against the MONAI Bundle specification ([] if none)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_METADATA if k not in meta]
    fmt = meta.get("network_data_format", {})
    for side in ("inputs", "outputs"):
        tensors = fmt.get(side)
        if not isinstance(tensors, Mapping) or not tensors:
            problems.append(f"network_data_format has no {side}")
            continue
        for name, spec in tensors.items():
            problems += [f"network_data_format.{side}.{name} lacks {k!r}" for k in REQUIRED_TENSOR_KEYS if k not in spec]
    if not isinstance(meta.get("required_packages_version", {}), Mapping):
        problems.append("required_packages_version must be a mapping")
    if "optional_packages_version" in meta:
        problems.append("optional_packages_version is deprecated (MONAI renames it over required_packages_version); "
                        "list every package under required_packages_version")
    if str(meta.get("version")) not in {str(k) for k in meta.get("changelog", {}) or {}}:
        problems.append(f"changelog has no entry for version {meta.get('version')!r}")
    return problems


_WORKFLOW_TYPES = {"train": "train", "inference": "infer"}  # MONAI property sets; evaluate.yaml is neither


def bundle_config(name: str | os.PathLike, config: str = "train") -> Path:
    """The path of ``configs/<config>.yaml`` of bundle ``name``, with a clear error if it has none."""
    path = bundle_root(name) / "configs" / f"{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"bundle {name} has no {config} config ({path})")
    return path


def run_bundle(name: str | os.PathLike, config: str = "train", overrides: Mapping | None = None,
               tracking: str | None = None) -> None:
    """Run ``configs/<config>.yaml`` of bundle ``name`` with ``overrides``, as ``python -m monai.bundle run`` does.

    The workflow is built directly (``ConfigWorkflow``), not through MONAI's ``run``, whose
    argument merging drops every ``None`` override: ``window_size=None`` must reach the config.
    Unknown settings are refused. ``bundle_root`` defaults to the current folder, like a
    model-zoo bundle run from its checkout; ``tracking="mlflow"`` adds MONAI's MLflow handlers.
    """
    from monai.bundle import ConfigWorkflow

    from .bundle_settings import check_known, config_settings

    configs = bundle_root(name) / "configs"
    config_file = bundle_config(name, config)
    meta = json.loads((configs / "metadata.json").read_text())
    problems = check_metadata(meta)
    if problems:
        raise ValueError(f"{configs / 'metadata.json'}: " + "; ".join(problems))
    settings = {"bundle_root": os.getcwd(), **(overrides or {})}
    check_known(settings, *config_settings(config_file), where=f"bundle {Path(name).name} ({config})")
    workflow = ConfigWorkflow(config_file=str(config_file), meta_file=str(configs / "metadata.json"),
                              logging_file=str(configs / "logging.conf"), workflow_type=_WORKFLOW_TYPES.get(config),
                              tracking=tracking, **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def data_overrides(data: str | os.PathLike) -> dict:
    """Bundle settings that fit ``data`` when it is a MedMNIST ``.npz`` (else none).

    MedMNIST images are small and fixed-size: train on the whole image (28 or 64 pixels), with
    patches of 4 pixels at 28 and 8 at 64 (a 7x7 or 8x8 grid), global attention (``window_size: 0``; windows buy
    nothing on so few tokens) and the image's own channel count.
    """
    path = Path(data)
    if path.suffix != ".npz":
        return {}
    import numpy as np

    try:
        npz = np.load(path, mmap_mode="r")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({type(exc).__name__})") from None
    with npz:
        keys = [k for k in npz.files if k.endswith("_images")]
        if not keys:
            raise ValueError(f"{path}: no <split>_images array (it has {npz.files}); a MedMNIST archive holds "
                             "train_images, train_labels, val_images, ...")
        key = "train_images" if "train_images" in keys else keys[0]
        shape = npz[key].shape[1:]  # (H, W), (H, W, 3) or (D, H, W)
    if len(shape) not in (2, 3):
        raise ValueError(f"{path}: {key} has shape {(None, *shape)}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)")
    size = int(shape[0])
    rgb = len(shape) == 3 and shape[-1] == 3
    spatial_dims = 2 if len(shape) == 2 or rgb else 3
    patch = 4 if size <= 32 else 8 if size <= 64 else 16
    return {"spatial_dims": spatial_dims, "image_size": size, "patch_size": patch, "window_size": 0,
            "in_channels": 3 if rgb else 1, "samples_per_volume": 1}


def bundle_parser(name: str | os.PathLike, overrides: Mapping | None = None, config: str = "train"):
    """A MONAI ``ConfigParser`` of bundle ``name`` with ``overrides`` applied (nothing instantiated yet).

    ``bundle_parser(b, o).get_parsed_content("network_def")`` rebuilds the encoder a run trained.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root(name) / "configs" / f"{config}.yaml"))
    parser.update(dict(overrides or {}))
    return parser
