"""The training engine: a ``monai.engines.SupervisedTrainer`` whose step runs a task.

One engine for everything medssl trains: self-supervised pretraining, multi-task mixes, and the
supervised fine-tuning and from-scratch baselines of the evaluation protocol
(:class:`~medssl.tasks.ClassificationTask`, :func:`medssl.eval.supervised.train_classifier`).
Everything around the step is a handler, as in MONAI's model-zoo bundles (LR schedule, stats,
TensorBoard, checkpoints, pictures, progress bar). The step itself:

``prepare_batch -> seed(seed, iteration, rank) -> step_start -> autocast(task forward) -> backward -> clip -> optimizer step -> step_end``

(``step_start``/``step_end`` give every task the training progress; DINO updates its EMA teacher
there.) It fires MONAI's ``IterationEvents`` as ``SupervisedTrainer`` does: ``FORWARD_COMPLETED``
and ``LOSS_COMPLETED`` with ``engine.state.output`` holding ``image``, ``label``, ``pred`` (the
task's output dict) and ``loss``, then ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED``. The step
returns plain floats (``loss`` plus whatever the task reports), which is what the handlers log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from ..distributed import rank, world_size
from ..errors import UserError
from ..tasks.base import Task
from .checkpoint import unwrap
from .determinism import AdaptiveBatchSampler, BinnedBatchSampler, EpochSampler, derive_seed
from .multitask import MultiTask
from .sources import SourceBatchSampler

__all__ = ["PretrainTrainer", "autocast_dtype", "prepare_task_batch", "SelectingOptimizerRefused"]

logger = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device | str, amp: bool | str = "auto") -> torch.dtype | None:
    """The mixed-precision dtype for ``device``, or None for full precision.

    ``"auto"``: bfloat16 where the hardware computes it natively (CUDA with bf16 support, CPUs with
    AVX512-BF16 or AMX; there a bf16 matrix product runs ~5x faster than fp32), float16 on older
    GPUs, else None. bf16 needs no loss scaling, so there is no GradScaler on that path.
    """
    device = torch.device(device)
    if amp is False or amp == "none":
        return None
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16"):
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _fit_decollated_transform(handler) -> None:
    """Let a handler that reads MONAI's decollated output (a list of per-sample dicts) read our step's dict.

    ``--tracking mlflow`` adds an ``MLFlowHandler`` whose ``output_transform`` is
    ``from_engine(['loss'], first=True)``: on a list of dicts that is the loss, on our dict a
    tuple, which crashed ``float()`` at iteration 1. Such a transform is given the dict as a
    one-item list; other transforms are left as they are.
    """
    transform = getattr(handler, "output_transform", None)
    if getattr(transform, "__qualname__", "").startswith("from_engine."):
        handler.output_transform = lambda out, t=transform: t([out]) if isinstance(out, dict) else t(out)


def prepare_task_batch(batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs) -> dict:
    """The trainer's default ``prepare_batch``: the whole batch dict, its tensors on ``device``
    (tasks read views, labels and metadata by key; MONAI's default keeps image and label only)."""
    if not isinstance(batchdata, dict):
        raise ValueError(f"a task trains on dict batches (image, views, label ...), got {type(batchdata).__name__}")
    return {k: v.to(device, non_blocking=non_blocking, **kwargs) if isinstance(v, torch.Tensor) else v for k, v in batchdata.items()}


class SelectingOptimizerRefused(UserError, ValueError):
    """DBA / EDBA asked for where they cannot run (several processes, several tasks)."""


def _fills_gradients(optimizer) -> bool:
    return callable(getattr(optimizer, "compute_gradients", None))


class PretrainTrainer(SupervisedTrainer):
    """Training of tasks (self-supervised, supervised, or a mix) on ``monai.engines``.

    Args:
        network: a :class:`~medssl.tasks.Task`, a list of tasks or a :class:`MultiTask` (possibly
            wrapped in ``DistributedDataParallel``).
        amp: ``"auto"`` (see :func:`autocast_dtype`), True/False, ``"bf16"`` or ``"fp16"``.
        clip_grad_norm: max gradient norm (None: no clipping).
        seed: seeds every step from ``(seed, iteration, rank)`` so a resumed run replays exactly.
        max_bad_steps: consecutive non-finite losses or gradients tolerated (steps skipped) before training stops.
        prepare_batch: ``(batch, device, non_blocking, **kwargs) -> dict`` (default :func:`prepare_task_batch`).
        quiet: log the start and skipped steps at debug level (the evaluation's many short runs
            report one summary line instead; ``skipped_steps`` counts them).

    An optimizer with ``compute_gradients(task, batch)`` (:class:`~medssl.optim.DBA`,
    :class:`~medssl.optim.EDBA`) fills the gradients itself in place of the forward + backward; one
    with ``next_batch_size()`` sets the batch size of the next epoch after each epoch, which the loader
    follows when its ``batch_sampler`` is an :class:`~medssl.engine.determinism.AdaptiveBatchSampler`
    (the run then ends after ``max_epochs`` epochs however many steps they took).
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader, network, optimizer,
                 epoch_length: int | None = None, train_handlers: Sequence | None = None, amp: bool | str = "auto",
                 clip_grad_norm: float | None = 3.0, seed: int = 0, max_bad_steps: int = 10, non_blocking: bool = True,
                 prepare_batch=prepare_task_batch, quiet: bool = False) -> None:
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs must be a whole number >= 1, got {max_epochs!r}")
        for handler in train_handlers or ():
            _fit_decollated_transform(handler)
        if isinstance(network, (Task, list, tuple)):
            network = MultiTask(network)
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network.to(device),
                         optimizer=optimizer, loss_function=None, epoch_length=epoch_length, non_blocking=non_blocking,
                         train_handlers=train_handlers, amp=False, decollate=False, prepare_batch=prepare_batch)
        self.autocast = autocast_dtype(device, amp)
        if self.autocast == torch.float16:
            self.scaler = torch.amp.GradScaler(device.type)
        self.clip_grad_norm, self.seed, self.max_bad_steps = clip_grad_norm, seed, max_bad_steps
        self.rank = rank()
        if self.rank != 0:  # one voice per run: the other ranks log warnings and errors only
            for name in ("medssl", self.logger.name):
                logging.getLogger(name).setLevel(logging.WARNING)
        self._bad_steps = 0
        self.skipped_steps = 0  # all steps skipped in this run (non-finite loss or gradient)
        self.quiet = quiet
        self._positioned = False
        self.selecting = _fills_gradients(optimizer)
        if self.selecting:
            self._check_selecting(network)
            self.scaler = None  # the optimizer computes unscaled gradients itself
        self.adaptive_batches = callable(getattr(optimizer, "next_batch_size", None))
        if self.adaptive_batches:
            self.add_event_handler(Events.STARTED, self._apply_batch_size)
            self.add_event_handler(Events.EPOCH_COMPLETED, self._next_batch_size)
        self.add_event_handler(Events.STARTED, self._reset_position)
        self.add_event_handler(Events.EPOCH_STARTED, self._position_sampler)
        (logger.debug if quiet else logger.info)("training on %s, autocast %s", device, self.autocast)

    # -- optimizers that choose samples and batch sizes (DBA, EDBA) --------------------------
    def _check_selecting(self, network) -> None:
        name = type(self.optimizer).__name__
        if world_size() > 1:
            raise SelectingOptimizerRefused(f"{name} chooses among one process's per-sample gradients; it does not run under "
                                            f"DDP ({world_size()} processes): use adamw or sgd there, or run on one process")
        tasks = unwrap(network)
        if len(tasks.names) != 1:
            raise SelectingOptimizerRefused(f"{name} trains one supervised task; this run mixes {', '.join(tasks.names)}")

    def _follow_batch_size(self, engine, size: int) -> bool:
        """The loader's batches become ``size`` and the epoch its new number of steps; False when the loader cannot follow."""
        sampler = getattr(self.data_loader, "batch_sampler", None)
        if not isinstance(sampler, AdaptiveBatchSampler):
            return False
        sampler.batch_size = size
        engine.state.epoch_length = len(self.data_loader)
        return True

    def _apply_batch_size(self, engine) -> None:
        """At the start (also of a resumed run): the loader takes the optimizer's batch size."""
        if not self._follow_batch_size(engine, self.optimizer.batch_size):
            logger.warning("%s adapts the batch size, but the loader's batch sampler is not an AdaptiveBatchSampler: "
                           "the batch size stays %s", type(self.optimizer).__name__, self.data_loader.batch_size)

    def _next_batch_size(self, engine) -> None:
        self._follow_batch_size(engine, self.optimizer.next_batch_size())

    def _is_done(self, state) -> bool:  # an instance method where ignite has a static one: epochs decide when batches vary
        if getattr(self, "adaptive_batches", False) and state.max_epochs is not None:
            return state.epoch >= state.max_epochs or (state.max_iters is not None and state.iteration >= state.max_iters)
        return Engine._is_done(state)

    # -- exact resume ---------------------------------------------------------------------
    def _reset_position(self, engine) -> None:
        self._positioned = False

    def _position_sampler(self, engine) -> None:
        """Once per ``run``: put the sampler where the (possibly restored) iteration counter says."""
        if self._positioned:
            return
        self._positioned = True
        sampler, size = getattr(self.data_loader, "sampler", None), self.data_loader.batch_size
        if isinstance(getattr(self.data_loader, "batch_sampler", None), (BinnedBatchSampler, SourceBatchSampler)):
            sampler = self.data_loader.batch_sampler
            size = sampler.batch_size
        if not isinstance(sampler, (EpochSampler, BinnedBatchSampler, SourceBatchSampler)):
            if engine.state.iteration:
                logger.warning("resuming with a loader that has no EpochSampler: the data order will not replay exactly")
            return
        done_in_epoch = engine.state.iteration % engine.state.epoch_length
        sampler.set_position(engine.state.epoch - 1, done_in_epoch * size)

    # -- one step -------------------------------------------------------------------------
    def _bad_step(self, iteration: int, what: str) -> dict[str, float]:
        """Skip this step (no update); stop after ``max_bad_steps`` in a row."""
        self._bad_steps += 1
        self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        (logger.debug if self.quiet else logger.warning)("iteration %d: %s, step skipped", iteration, what)
        if self._bad_steps > self.max_bad_steps:
            raise FloatingPointError(f"{self._bad_steps} consecutive non-finite steps (last at iteration {iteration}: {what}); "
                                     "lower the learning rate or check the data")
        return {"loss": float("nan")}

    def _iteration(self, engine, batchdata: dict) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("the loader gave no batch")
        device = engine.state.device
        batch = engine.prepare_batch(batchdata, device, engine.non_blocking, **engine.to_kwargs)
        iteration = engine.state.iteration
        torch.manual_seed(derive_seed(self.seed, iteration, self.rank))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        tasks = unwrap(engine.network)
        progress = iteration / max(1, engine.state.max_epochs * engine.state.epoch_length)
        tasks.step_start(progress)
        engine.state.output = {Keys.IMAGE: batch.get("image"), Keys.LABEL: batch.get("label")}
        with torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self.selecting:  # DBA / EDBA: the optimizer runs the task and fills the gradients
                task = tasks.tasks[tasks.names[0]]
                out = dict(engine.optimizer.compute_gradients(task, batch))
            else:
                out = engine.network(batch, iteration)
            engine.state.output[Keys.PRED] = out
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = out["loss"]
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            return self._bad_step(iteration, f"non-finite loss {float(loss.detach())}")
        if self.selecting:
            pass
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(engine.optimizer)
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        grad_norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.clip_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm) and self.scaler is None:  # a finite loss can still have NaN/inf gradients
            return self._bad_step(iteration, f"non-finite gradient norm {float(grad_norm)}")
        if self.scaler is not None:
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        tasks.step_end(progress)
        self._bad_steps = 0
        result = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        result["grad_norm"] = float(grad_norm)
        result["lr"] = engine.optimizer.param_groups[0]["lr"]
        return result
