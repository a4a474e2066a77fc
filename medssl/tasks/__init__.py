"""Pretraining tasks: one file each, all registered by name in :data:`TASKS`."""

from .base import TASKS, Task, build_task, register_task
from .mae import MAETask
from .masking import TokenMask, patch_foreground, sample_mask
from .patchify import patchify, unpatchify

__all__ = ["Task", "TASKS", "register_task", "build_task", "MAETask", "TokenMask", "sample_mask", "patch_foreground",
           "patchify", "unpatchify"]
