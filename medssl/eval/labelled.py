"""Labelled data for evaluation: a MedMNIST ``.npz``, a CSV of (image, label[, split][, modality]) or a datalist ``.json``.

Everything becomes fixed-size tensors in memory, ``{split: (images (N, C, *size), labels (N,))}``:
MedMNIST splits as stored; files through medssl's deterministic pipeline (2D resized and padded
to ``size``; 3D volumes resized to ``size`` per axis). Without a split column, a stratified 20 %
of the items becomes ``val`` (seeded), and the reports say which split they used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_labelled", "check_classes"]


def _from_entries(entries: list[dict], spatial_dims: int, size: int, channels: int, ct_windows) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.transforms import Resize

    from ..data.pipeline import build_transforms

    transform = build_transforms(spatial_dims=spatial_dims, size=size, channels=channels, ct_windows=ct_windows, train=False)
    resize = Resize(spatial_size=(size,) * spatial_dims, mode="area")
    images, labels = [], []
    for e in entries:
        img = torch.as_tensor(transform(dict(e))["image"]).float()
        if tuple(img.shape[1:]) != (size,) * spatial_dims:
            img = torch.as_tensor(resize(img)).float()
        images.append(img)
        labels.append(int(e["label"]))
    return torch.stack(images), torch.tensor(labels)


def load_labelled(data: str | os.PathLike, spatial_dims: int = 2, size: int = 28, channels: int = 1, ct_windows="abdomen",
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (images, labels)}`` for ``train`` and ``val`` (and ``test`` when the data has it)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".npz":
        from ..data.medmnist import load_medmnist, medmnist_splits

        out = {}
        for split in medmnist_splits(path):
            entries = load_medmnist(path, split)
            out[split] = (torch.stack([torch.as_tensor(e["image"]) for e in entries]).float(),
                          torch.tensor([int(e["label"]) for e in entries]))
        if "train" not in out or len(out) < 2:
            raise ValueError(f"{path}: need a 'train' split and a 'val' or 'test' split, found {sorted(out)}")
        return check_classes(out, path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: labelled data must be a MedMNIST .npz, a CSV with image,label[,split][,modality] "
                         "columns or a datalist .json whose entries have a label")
    from ..data.dataset import load_datalist, load_source

    if path.suffix == ".json":  # MONAI datalist: its sections are the splits unless entries name one
        import json

        sections = json.loads(path.read_text())
        rows = [dict(e, split=e.get("split", split)) for key, split in (("training", "train"), ("validation", "val"), ("test", "test"))
                if isinstance(sections, dict) and key in sections for e in load_datalist(path, key)]
        if not rows:
            raise ValueError(f"{path}: no 'training' / 'validation' / 'test' entries")
    else:
        rows = load_source(path)
    if any("label" not in r for r in rows):
        raise ValueError(f"{path}: every row needs a label")
    for r in rows:
        r["split"] = {"training": "train", "validation": "val"}.get(r.get("split", ""), r.get("split", ""))
    splits = {r["split"] for r in rows}
    if not splits - {""}:
        from .fractions import stratified_subset

        labels = np.array([int(r["label"]) for r in rows])
        val = set(stratified_subset(labels, 0.2, seed=seed).tolist())
        for i, r in enumerate(rows):
            r["split"] = "val" if i in val else "train"
    out = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            out[split] = _from_entries(chosen, spatial_dims, size, channels, ct_windows)
    if "train" not in out or ("val" not in out and "test" not in out):
        raise ValueError(f"{path}: need a 'train' split and a 'val' or 'test' split, found {sorted(out)}")
    return check_classes(out, path)


def check_classes(splits: dict, path) -> dict:
    """Refuse label sets no evaluation can learn from; warn loudly about a one-class evaluation split."""
    import sys

    train = set(splits["train"][1].tolist())
    if len(train) < 2:
        raise ValueError(f"{path}: the train split has one class only ({sorted(train)}); a classifier needs two or more")
    for name in ("val", "test"):
        if name not in splits:
            continue
        classes = set(splits[name][1].tolist())
        if classes - train:
            raise ValueError(f"{path}: classes {sorted(classes - train)} occur in {name} but never in train, so no method "
                             "can predict them; move some of those images to train")
        if len(classes) < 2:
            print(f"medssl: warning: {path}: the {name} split has one class only ({sorted(classes)}): AUC is undefined "
                  "and accuracy only counts that class; read balanced accuracy, and add images of the other classes",
                  file=sys.stderr)
    return splits
