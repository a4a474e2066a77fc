"""Training: the monai.engines trainer, task schedules, determinism, checkpoints and handlers."""

from .checkpoint import AtomicCheckpointSaver, InitialEncoder, ResumeFromLatest, atomic_save, latest_checkpoint, unwrap
from .collapse import CollapseMonitor
from .determinism import BinnedBatchSampler, EpochSampler, SeededDataset, derive_seed, pretrain_loader
from ..distributed import is_main_process
from .handlers import MainProcessOnly, ProgressBar, TaskPictures, scalars
from .lr_schedule import WarmupCosine, warmup_cosine
from .multitask import MultiTask, TaskSchedule
from .sources import SourceBatchSampler, SourcePlan, SourceSchedule, multi_source_loader, source_tasks
from .trainer import PretrainTrainer, autocast_dtype
from .validation import TaskValidation

__all__ = ["CollapseMonitor", "InitialEncoder", "PretrainTrainer", "autocast_dtype", "MultiTask", "TaskSchedule", "EpochSampler", "BinnedBatchSampler", "SeededDataset", "derive_seed",
           "pretrain_loader", "AtomicCheckpointSaver", "ResumeFromLatest", "atomic_save", "latest_checkpoint", "unwrap",
           "ProgressBar", "TaskPictures", "MainProcessOnly", "is_main_process", "scalars", "WarmupCosine", "warmup_cosine", "TaskValidation",
           "SourcePlan", "SourceBatchSampler", "SourceSchedule", "multi_source_loader", "source_tasks"]
