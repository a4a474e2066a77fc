"""Which fields of a datalist entry reach a batch, and how they are collated.

Every scalar field of an entry travels with its image: ``modality``, ``spatial_dims``,
``patient``, ``label``, ``source``, ``organ``, ``split`` and any field a user adds. Views read
``modality`` (a CT gets its HU-window jitter, a radiograph does not), a patient-mixing task
reads ``patient`` and ``modality``, a conditioned encoder reads the context
(:func:`medssl.models.base.batch_context`). Lists, dicts and ``None`` stay behind (a DICOM
series' file list, the scan's shape and spacing).

:func:`collate_fields` batches them: tensors stacked, numbers as a tensor, strings (and a field
whose items mix types) as a list; a field that only some items of a batch carry is left out of
that batch rather than failing it.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import list_data_collate
from monai.transforms import MapTransform

__all__ = ["KeepFieldsd", "collate_fields", "is_scalar"]

logger = logging.getLogger(__name__)


def is_scalar(value) -> bool:
    """A string, a number, a bool, or a 0-d array / tensor."""
    if isinstance(value, (str, numbers.Number, np.generic)):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0


class KeepFieldsd(MapTransform):
    """Keep ``keys`` (the image tensors) and every scalar field of the item; drop the rest."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        keep = set(self.keys)
        return {k: v for k, v in data.items() if k in keep or (v is not None and is_scalar(v))}


_dropped_warned: set = set()


def collate_fields(items: list) -> dict:
    """MONAI's ``list_data_collate`` (multi-patch samples flattened into the batch) after making
    the items' fields agree: only fields every item has, and strings where the types mix."""
    flat = [x for it in items for x in (it if isinstance(it, list) else [it])]
    if not flat or not all(isinstance(x, Mapping) for x in flat):
        return list_data_collate(items)
    common = set(flat[0]).intersection(*flat[1:])
    dropped = set().union(*flat) - common
    for key in dropped - _dropped_warned:
        _dropped_warned.add(key)
        logger.debug("field %r is missing in some items of a batch; left out of such batches", key)
    fixed = []
    for key in common:
        values = [x[key] for x in flat]
        if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) for v in values):
            fixed.append(key)
    flat = [{k: (str(x[k]) if k in fixed else x[k]) for k in x if k in common} for x in flat]
    return list_data_collate(flat)
