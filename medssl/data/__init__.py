"""Files on disk -> datalists -> tensors. Modules are imported on first use (``medssl.data.scan``...)."""

import importlib

_MODULES = ("privacy", "dicom", "scan", "io", "intensity", "patches", "pipeline", "dataset", "medmnist", "synthetic")


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
