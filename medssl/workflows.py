"""The runs a user starts, as library functions: what ``medssl pretrain`` / ``medssl evaluate`` do,
and what ``bench/`` scripts and notebooks call.

- :func:`pretrain`: a bundle's train config into a locked run folder, its settings recorded in
  ``run.json`` (resume, overwrite, private paths, MLflow tracking);
- :func:`evaluate`: the evaluation protocol on an encoder checkpoint, built from its run record;
- :func:`fuse`: fused scans of several patients (BrainFuse) as a run makes them, written as files;
- :func:`parse_sets`: ``KEY=VALUE`` settings as the command line gives them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

__all__ = ["pretrain", "evaluate", "fuse", "parse_sets", "private_path", "check_dimensionality"]


logger = logging.getLogger(__name__)

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
             progress: bool = True, private: bool = False, settings: dict | None = None) -> list[Path]:
    """Evaluate an encoder checkpoint on labelled ``data`` (see :mod:`medssl.eval.protocol`); returns the report files.

    The encoder is built by the bundle's ``evaluate`` config with the run's recorded settings, then
    ``settings`` on top (``--set``: e.g. ``spatial_dims``, ``organ``, ``modality`` of one data set for a
    Medformer trained on several). ``private`` records the data and checkpoint paths in the reports as hashes.
    """
    from .bundle_settings import check_known, config_settings
    from .bundles import bundle_config, bundle_parser
    from .eval.protocol import evaluate_checkpoint
    from .run_record import checkpoint_record

    ckpt = Path(checkpoint).resolve()
    name, recorded_settings = checkpoint_record(ckpt, bundle, config="evaluate")
    if settings:
        check_known(settings, *config_settings(bundle_config(name, "evaluate")), where=f"bundle {name} (evaluate)")
    get = bundle_parser(name, {**recorded_settings, **(settings or {})}, "evaluate").get_parsed_content
    recorded = {"checkpoint": private_path(ckpt) if private else str(ckpt),
                "data": private_path(data) if private else str(Path(data).resolve()), "bundle": name}
    factory = get("network_def", lazy=False)  # the evaluate config's network_def is a factory (a fresh encoder per call)
    return evaluate_checkpoint(factory, ckpt, data, out, spatial_dims=get("spatial_dims"),
                               size=get("image_size"), channels=get("in_channels"), ct_window=get("ct_window"), plan=plan,
                               progress=progress, recorded=recorded,
                               title=f"{name} on {'private data' if private else Path(data).name}")


def fuse(checkpoint, data, out, patients: int = 2, count: int = 4, space: str = "both", smoothness: float | None = None,
         regions: int | None = None, seed: int = 0, bundle: str | None = None, max_images: int = 64) -> list[Path]:
    """Fused scans of ``patients`` different patients of ``data``, as a run of ``checkpoint`` makes them.

    Writes, per fused scan, ``fused_NNN_raw`` and (with a trained generator) ``fused_NNN_latent`` (the
    decoded mix) and ``fused_NNN_latent_detail`` (with detail transfer) as NIfTI (3D) or PNG (2D), ``fused_NNN_partition`` (the source of each voxel, 1..K; a colour PNG in
    2D), ``fusion.json`` (per scan: the sources' positions in ``data``, hashed patient ids and shares)
    and ``fusion.png`` (sources, partition, raw and latent fusion side by side). The generator is
    read from the run's full checkpoint (``RUN/models/checkpoint_*.pt``); an encoder-only checkpoint
    gives raw fusion only, and says so.
    """
    import torch

    from .bundles import bundle_parser
    from .data.dataset import build_dataset, load_source
    from .data.pipeline import build_transforms
    from .data.tiling import most_foreground_block
    from .engine.checkpoint import latest_checkpoint, load_checkpoint
    from .eval.features import load_encoder
    from .run_record import checkpoint_record
    from .tasks.brainfuse import BrainFuseTask
    from .viz.panels import region_colours, write_panels

    if space not in ("raw", "latent", "both"):
        raise ValueError(f"--space must be raw, latent or both, got {space!r}")
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    ckpt = Path(checkpoint).resolve()
    name, settings = checkpoint_record(ckpt, bundle)
    get = bundle_parser(name, settings).get_parsed_content
    dims, size = get("spatial_dims"), get("image_size")
    encoder = load_encoder(get("network_def", lazy=False), ckpt).eval()
    smoothness = float(settings.get("fuse_smoothness", 0.05) if smoothness is None else smoothness)
    task = BrainFuseTask(encoder, space="latent" if space != "raw" else "raw", n_patients=patients, n_regions=regions,
                         smoothness=smoothness, consistency_weight=1.0).eval()  # the weight only lets raw fusion be built; nothing trains
    note = None
    if task.generator is not None:
        full = ckpt if ckpt.name.startswith("checkpoint_") else latest_checkpoint(ckpt.parent)
        state = load_checkpoint(full, map_location="cpu").get("network", {}) if full else {}
        prefix = next((k.rsplit("generator.", 1)[0] + "generator." for k in state if ".generator." in k and "raw_brainfuse" not in k), None)
        if prefix is None:
            note = f"no trained generator in {full or ckpt.parent} (the run had no latent brainfuse task): raw fusion only"
            task.generator = None
        else:
            task.generator.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    entries = load_source(data, spatial_dims=dims)[:max_images]
    if not entries:
        raise ValueError(f"no {dims}D images in {data}")
    transform = build_transforms(train=False, spatial_dims=dims, size=size, channels=get("in_channels"), ct_windows=get("ct_window"))
    dataset = build_dataset(entries, transform, cache="none")
    images, keys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        img = torch.as_tensor(item["image"]).float()
        images.append(most_foreground_block(img, size) if dims == 3 else img)
        keys.append(str(item.get("patient", i)))
    batch = {"image": torch.stack(images), "patient": keys}
    groups, part = task.plan(batch, torch.Generator().manual_seed(seed), n_fused=count)
    panels, weights = task.panels(batch, groups, part)
    raw, latent, detail = panels["raw fusion"], panels.get("latent fusion"), panels.get("latent + detail")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    owner = weights.argmax(1, keepdim=True)
    written, record = [], []
    for i in range(len(groups)):
        files = {"raw": raw[i], **({"latent": latent[i], "latent_detail": detail[i]} if latent is not None else {})}
        for kind, img in files.items():
            written.append(_write_scan(img, out / f"fused_{i:03d}_{kind}", dims))
        written.append(_write_scan(owner[i].float() + 1, out / f"fused_{i:03d}_partition", dims, labels=True,
                                   colours=region_colours(owner[i:i + 1])[0]))
        record.append({"fused": i, "sources": groups[i].tolist(),
                       "patients": [keys[j] for j in groups[i].tolist()],
                       "shares": [round(float(s), 4) for s in weights[i].flatten(1).mean(1)]})
    from .atomic import atomic_write

    with atomic_write(out / "fusion.json", "w") as f:
        json.dump({"checkpoint": str(ckpt), "patients": patients, "smoothness": smoothness, "seed": seed, "fused": record}, f, indent=2)
    written.append(out / "fusion.json")
    written.append(write_panels(panels, out / "fusion.png", title=f"{name}: {patients} patients fused ({ckpt.name})"))
    if note:
        print(note, file=sys.stderr)
    return written


def _write_scan(img, stem: Path, dims: int, labels: bool = False, colours=None) -> Path:
    """One fused scan (or partition) as NIfTI (3D) or PNG (2D), written atomically."""
    import numpy as np

    from .atomic import atomic_write

    if dims == 3:
        import gzip

        import nibabel as nib

        array = img[0].cpu().numpy().astype(np.uint8 if labels else np.float32)
        path = stem.with_suffix(".nii.gz")
        with atomic_write(path) as f:
            f.write(gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes()))
        return path
    from PIL import Image

    from .viz.views import display_2d

    picture = display_2d((colours if colours is not None else img).cpu())
    array = (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)
    path = stem.with_suffix(".png")
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")
    return path


def prepare(bundle: str, data: str | Path, cache_dir: str | Path, overrides: dict | None = None, workers: int = 2,
            progress: bool = True) -> dict:
    """Fill the shared disk cache (``cache: disk``) for ``data`` with bundle ``bundle``'s deterministic transforms.

    The items are exactly those a training run with the same settings reads: train with
    ``--set cache=disk --set cache_dir=CACHE_DIR`` (and the same other settings) and every item is a cache hit.
    Items already cached are left alone, files that cannot be read are reported and skipped, and
    ``workers`` processes fill the cache side by side (each file written atomically).
    Returns the counts: ``written``, ``present``, ``unreadable`` (with ``reasons``), ``seconds``.
    """
    import time

    import torch

    from .bundles import bundle_parser
    from .data.cache import SharedCacheDataset
    from .data.io import describe, root_cause

    settings = {**(overrides or {}), "dataset_dir": str(Path(data).resolve()), "cache": "disk", "cache_dir": str(Path(cache_dir).resolve())}
    from .bundle_settings import check_known, config_settings
    from .bundles import bundle_config

    check_known(settings, *config_settings(bundle_config(bundle)), where=f"bundle {bundle}")
    parser = bundle_parser(bundle, settings)
    entries = parser.get_parsed_content("train#entries", lazy=False)
    transform = parser.get_parsed_content("train#preprocessing", lazy=False)
    cache = SharedCacheDataset(entries, transform, cache_dir)

    class _Fill(torch.utils.data.Dataset):
        def __len__(self):
            return len(cache)

        def __getitem__(self, i):
            try:
                return i, "written" if cache.prepare(i) else "present", ""
            except Exception as exc:
                return i, "unreadable", f"{describe(cache.data[i].get('image'))}: {root_cause(exc)}"

    results = torch.utils.data.DataLoader(_Fill(), batch_size=None, num_workers=max(0, int(workers)))
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(cache), desc=f"preparing {cache_dir}", unit="item")
    elif progress:
        from .progress import plain_progress

        results = plain_progress(results, len(cache), f"preparing {cache_dir}", "items")
    counts = {"written": 0, "present": 0, "unreadable": 0, "reasons": []}
    started = time.perf_counter()
    for _, status, reason in results:
        counts[status] += 1
        if reason:
            counts["reasons"].append(reason)
            logger.warning("skipping %s", reason)
    counts["seconds"] = time.perf_counter() - started
    return counts
