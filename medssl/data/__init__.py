"""Files on disk -> datalists -> tensors. Modules are imported on first use (``medssl.data.scan``...)."""

from ..lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
