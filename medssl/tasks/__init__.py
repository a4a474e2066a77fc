"""Pretraining tasks: one file each, all registered by name in :data:`TASKS`."""

from .barlow import BarlowTwinsTask
from .brainfuse import BrainFuseTask, RawBrainFuseTask
from .byol import BYOLTask
from .base import TASKS, Task, build_task, check_batch, register_task
from .classify import ClassificationTask
from .dino import DINOTask
from .heads import DINOHead, ProjectionMLP
from .ijepa import IJEPATask
from .jigsaw import JigsawTask
from .mae import MAETask
from .query_box import QueryBoxTask
from .masking import TokenMask, patch_foreground, sample_mask
from .patchify import patchify, unpatchify
from .simclr import SimCLRTask, nt_xent
from .swav import SwAVTask

__all__ = ["Task", "TASKS", "register_task", "build_task", "check_batch", "MAETask", "DINOTask", "SimCLRTask",
           "BarlowTwinsTask", "BYOLTask", "SwAVTask", "IJEPATask", "ClassificationTask", "JigsawTask", "QueryBoxTask", "BrainFuseTask", "RawBrainFuseTask", "DINOHead", "ProjectionMLP", "nt_xent", "TokenMask", "sample_mask", "patch_foreground",
           "patchify", "unpatchify"]
