"""Preview grids: what the model will see, written as PNG pages.

For 3D entries a row shows the whole volume after loading, orientation and the intensity preset
(axial / coronal / sagittal through its centre) followed by training patches drawn by the real
pipeline (their central axial slice). For 2D entries each tile is the image after the 2D
pipeline. Titles give the modality, the original shape and spacing, and the hashed patient id.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .figure import save_figure
from .views import display_2d, orthogonal_views

__all__ = ["write_previews"]

logger = logging.getLogger(__name__)


def _title(entry: dict) -> str:
    shape = "x".join(str(s) for s in entry.get("shape", []))
    spacing = "x".join(f"{s:g}" for s in entry.get("spacing", []))
    patient = str(entry.get("patient", ""))[:8]
    return f"{entry.get('modality', '?')} {shape}" + (f" @ {spacing} mm" if spacing else "") + (f"\npatient {patient}" if patient else "")


def _pages(items: list, per_page: int):
    for start in range(0, len(items), per_page):
        yield start // per_page, items[start : start + per_page]


def write_previews(entries: list[dict], out: str | os.PathLike, size_3d: int = 64, size_2d: int = 224, patches: int = 2,
                   per_page: int = 6, max_items: int = 24, ct_windows="abdomen", seed: int = 0, progress: bool = True) -> list[Path]:
    """Write preview PNGs of up to ``max_items`` entries to ``out``; returns the files written.

    Entries that fail to load are listed on the page with the reason instead of an image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.transforms import Compose, Orientationd
    from tqdm.auto import tqdm

    from ..data.intensity import ModalityIntensityd
    from ..data.io import LoadMedicalImaged, root_cause
    from ..data.pipeline import build_transforms

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load = LoadMedicalImaged()
    show_3d = Compose([Orientationd(keys="image", axcodes="RAS", labels=None), ModalityIntensityd(ct_windows=ct_windows)])
    patcher = build_transforms(spatial_dims=3, size=size_3d, num_samples=patches, ct_windows=ct_windows,
                               channels=len(ct_windows) if isinstance(ct_windows, list) else 1)
    assert isinstance(patcher.transforms[0], LoadMedicalImaged)  # the volume is loaded once and shared below
    patcher.set_random_state(seed)
    show_2d = build_transforms(spatial_dims=2, size=size_2d, channels=3)
    written: list[Path] = []
    chosen = entries[:max_items]
    bar = tqdm(total=len(chosen), desc="preview", unit="image", disable=not progress)

    vols = [e for e in chosen if e.get("spatial_dims", 3) == 3]
    for page, group in _pages(vols, per_page):
        cols = 3 + patches
        fig, axes = plt.subplots(len(group), cols, figsize=(2.4 * cols, 2.6 * len(group)), squeeze=False)
        for row, entry in zip(axes, group):
            for ax in row:
                ax.axis("off")
            try:
                loaded = load(entry)
                vol = show_3d(loaded)["image"]
                for ax, (name, view) in zip(row, orthogonal_views(vol).items()):
                    ax.imshow(view, cmap="gray", vmin=0, vmax=1)
                    ax.set_title(name, fontsize=8)
                for j, sample in enumerate(patcher(loaded, start=1)):  # the real pipeline after its loading step
                    patch = sample["image"]
                    row[3 + j].imshow(orthogonal_views(patch)["axial"], cmap="gray", vmin=0, vmax=1)
                    row[3 + j].set_title(f"patch {j + 1} {size_3d}^3", fontsize=8)
                row[0].text(-0.05, 0.5, _title(entry), transform=row[0].transAxes, ha="right", va="center", fontsize=7)
            except Exception as exc:  # show the failure where the picture would be
                row[0].text(0, 0.5, f"cannot load:\n{str(root_cause(exc))[:160]}", fontsize=7, color="red", wrap=True)
                logger.warning("preview: %s", root_cause(exc))
            bar.update(1)
        written.append(save_figure(fig, out / f"preview_3d_{page:03d}.png"))

    images = [e for e in chosen if e.get("spatial_dims", 3) == 2]
    cols = 4
    for page, group in _pages(images, per_page * 2):
        rows = int(np.ceil(len(group) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, entry in zip(axes.ravel(), group):
            try:
                img = display_2d(show_2d(entry)["image"])
                ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
                ax.set_title(_title(entry), fontsize=7)
            except Exception as exc:
                ax.text(0, 0.5, f"cannot load:\n{str(root_cause(exc))[:160]}", fontsize=7, color="red", wrap=True)
                logger.warning("preview: %s", root_cause(exc))
            bar.update(1)
        written.append(save_figure(fig, out / f"preview_2d_{page:03d}.png"))
    bar.close()
    return written
