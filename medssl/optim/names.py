"""The optimizer and selection-strategy names users give (``--optimizer``, ``--dba-strategy``, bundle settings).

Plain data, no torch: the command line lists them in its help without importing the optimizers.
"""

from __future__ import annotations

from ..errors import UserError

__all__ = ["PLAIN", "OPTIMIZERS", "STRATEGIES", "parse_optimizer", "UnknownOptimizer"]

PLAIN = ("adamw", "adam", "sgd")
#: ``dba`` / ``edba`` wrap AdamW; ``dba-sgd``, ``edba-adam`` ... name the wrapped optimizer.
OPTIMIZERS = (*PLAIN, *(f"{w}{s}" for w in ("dba", "edba") for s in ("", *(f"-{p}" for p in PLAIN))))
STRATEGIES = ("gradient_norm", "variance_norm", "all")


class UnknownOptimizer(UserError, ValueError):
    pass


def parse_optimizer(name: str) -> tuple[str | None, str]:
    """``"dba-sgd" -> ("dba", "sgd")``, ``"edba" -> ("edba", "adamw")``, ``"sgd" -> (None, "sgd")``."""
    if name not in OPTIMIZERS:
        raise UnknownOptimizer(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    wrapper, _, inner = name.partition("-")
    if wrapper in PLAIN:
        return None, wrapper
    return wrapper, inner or "adamw"
