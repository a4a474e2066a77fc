"""Optimizers by name, as ``medssl evaluate --optimizer`` and the bundles' ``optimizer`` setting give them.

``adamw``, ``adam``, ``sgd`` (momentum 0.9, Nesterov off), and the batch-adapting wrappers
``dba`` / ``edba`` around any of them: ``dba`` is DBA around AdamW, ``dba-sgd`` around SGD,
``edba-adam`` EDBA around Adam, and so on.
"""

from __future__ import annotations

import inspect

import torch

from .dba import DBA
from .edba import EDBA
from .names import UnknownOptimizer, parse_optimizer

__all__ = ["build_optimizer"]


def build_optimizer(name: str, params, model: torch.nn.Module | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                    batch_size: int = 64, **options) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (parameters or groups); ``options`` go to DBA / EDBA.

    DBA / EDBA options default to: batch-size bounds ``[max(2, batch_size // 8), 8 * batch_size]`` and
    ``delta = max(1, batch_size // 8)``. EDBA needs ``model`` (its last linear layer is where it selects).
    """
    wrapper, inner = parse_optimizer(name)
    if inner == "sgd":
        base = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif inner == "adam":
        base = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        base = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if wrapper is None:
        if options:
            raise UnknownOptimizer(f"{name} takes no DBA options (got {', '.join(sorted(options))})")
        return base
    bounds = {"batch_size": batch_size, "min_batch_size": max(2, batch_size // 8), "max_batch_size": 8 * batch_size,
              "delta": max(1, batch_size // 8)}
    bounds.update({k: v for k, v in options.items() if k in bounds})
    cls = DBA if wrapper == "dba" else EDBA
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise UnknownOptimizer(f"{name} has no option {', '.join(unknown)} (it takes {', '.join(k for k in accepted if k != 'optimizer')})")
    rest = {k: v for k, v in options.items() if k not in bounds}
    if wrapper == "dba":
        return DBA(base, **bounds, **rest)
    if model is None:
        raise ValueError("edba needs the model (it selects on its last linear layer)")
    return EDBA(base, model, **bounds, **rest)
