"""Modality intensity presets: CT windows, MR percentile scaling, radiograph/fundus min-max.

Each preset maps raw scanner values to [0, 1] with a MONAI transform (``ScaleIntensityRange``,
``ScaleIntensityRangePercentiles``, ``ScaleIntensity``); what is ours is the choice of preset per
entry (its ``modality``) and the named CT windows, so one pipeline serves a datalist that mixes
CT, MR, radiographs and photographs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform

__all__ = [
    "CT_WINDOWS",
    "HUWindow",
    "HUWindowd",
    "ModalityIntensity",
    "ModalityIntensityd",
    "ToChannels",
    "ToChannelsd",
    "preset_for",
]

# (level, width) in HU. Common radiology reading windows (Radiopaedia "windowing (CT)").
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}

MR_LIKE = {"MR", "PT", "NM"}
PHOTO_LIKE = {"XR", "CR", "DX", "MG", "RF", "XA", "US", "FUNDUS", "OP", "XC", "ES", "OT", "SM", "IO", "PX", "GM"}


def _window(window: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; choose one of {sorted(CT_WINDOWS)} or give (level, width)")
        return CT_WINDOWS[window]
    level, width = (float(v) for v in window)
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got level={level}, width={width}")
    return level, width


def _windows(windows) -> list[tuple[float, float]]:
    """Accept 'abdomen', (40, 400), ['brain', 'subdural'] or [(40, 80), (80, 200)]."""
    if isinstance(windows, str) or (
        isinstance(windows, Sequence) and len(windows) == 2 and all(isinstance(v, (int, float)) for v in windows)
    ):
        windows = [windows]
    out = [_window(w) for w in windows]
    if not out:
        raise ValueError("at least one CT window is needed")
    return out


class HUWindow(Transform):
    """Clip CT values in HU to one or more windows, each scaled to [0, 1] and stacked as channels.

    Args:
        windows: a window name from :data:`CT_WINDOWS`, a ``(level, width)`` pair, or a list of
            either (one output channel per window, e.g. ``["brain", "subdural", "bone"]``).
    """

    def __init__(self, windows="abdomen") -> None:
        self.windows = _windows(windows)
        self.scalers = [
            ScaleIntensityRange(a_min=l - w / 2, a_max=l + w / 2, b_min=0.0, b_max=1.0, clip=True) for l, w in self.windows
        ]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        hu = img[:1]  # (1, *spatial): CT has one channel
        return torch.cat([scale(hu) for scale in self.scalers], dim=0)  # (n_windows, *spatial)


class HUWindowd(MapTransform):
    """Dictionary wrapper of :class:`HUWindow`."""

    def __init__(self, keys: KeysCollection, windows="abdomen", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(windows)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


def preset_for(modality: str) -> str:
    """The intensity preset a modality gets by default: ``ct``, ``mr`` or ``minmax``."""
    modality = (modality or "OT").upper()
    if modality == "CT":
        return "ct"
    return "mr" if modality in MR_LIKE else "minmax"


class ModalityIntensity(Transform):
    """Map raw values to [0, 1] with the preset of the image's modality.

    - ``ct``: HU windows (:class:`HUWindow`), one channel per window;
    - ``mr``: robust percentile scaling (MR, PET and NM have no absolute scale);
    - ``minmax``: min-max over the image (radiographs, ultrasound, fundus photographs);
    - ``none``: values are left as they are (already normalised data such as MedMNIST).

    Args:
        ct_windows: windows for CT (see :class:`HUWindow`).
        mr_percentiles: lower and upper percentiles for MR-like images.
    """

    def __init__(self, ct_windows="abdomen", mr_percentiles: tuple[float, float] = (0.5, 99.5)) -> None:
        low, high = mr_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {mr_percentiles}")
        self.presets = {
            "ct": HUWindow(ct_windows),
            "mr": ScaleIntensityRangePercentiles(lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True),
            "minmax": ScaleIntensity(minv=0.0, maxv=1.0),
            "none": lambda img: img,
        }

    def __call__(self, img: torch.Tensor, modality: str = "OT", preset: str | None = None) -> torch.Tensor:
        preset = preset or preset_for(modality)
        if preset not in self.presets:
            raise ValueError(f"unknown intensity preset {preset!r}; choose one of {sorted(self.presets)}")
        return self.presets[preset](img)


class ModalityIntensityd(MapTransform):
    """Dictionary wrapper of :class:`ModalityIntensity`: reads ``modality`` (and an optional
    ``preset`` override) from each entry."""

    def __init__(self, keys: KeysCollection = "image", ct_windows="abdomen", mr_percentiles=(0.5, 99.5),
                 modality_key: str = "modality", preset_key: str = "preset", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.intensity = ModalityIntensity(ct_windows, tuple(mr_percentiles))
        self.modality_key, self.preset_key = modality_key, preset_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.intensity(d[key], d.get(self.modality_key, "OT"), d.get(self.preset_key))
        return d


class ToChannels(Transform):
    """Give every image the channel count the model expects.

    Grey -> RGB repeats the channel; RGB(A) -> grey takes the mean of R, G, B; equal counts pass.
    A CT with several windows already has one channel per window and must match ``channels``.
    """

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c == self.channels:
            return img
        if c == 1:
            return img.repeat(self.channels, *([1] * (img.ndim - 1)))
        if self.channels == 1 and c in (3, 4):
            return img[:3].mean(dim=0, keepdim=True)
        raise ValueError(f"cannot turn an image with {c} channels into {self.channels} channels")


class ToChannelsd(MapTransform):
    """Dictionary wrapper of :class:`ToChannels`."""

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.to_channels = ToChannels(channels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.to_channels(d[key])
        return d
