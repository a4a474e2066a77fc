"""Optimizers that look at every sample's gradient: Dynamic Batch Adaptation (DBA) and Efficient DBA.

- :mod:`.names`: the names users give (no torch: the command line's help lists them);
- :mod:`.per_sample`: exact per-sample gradients (``torch.func`` ``vmap(grad)``; a linear layer's
  from its inputs and output gradients), grouped by layer;
- :mod:`.selection`: a layer's per-sample gradients cut into strides, and the strategies that
  choose which strides make the layer's gradient;
- :mod:`.batch_size`: the source's equation 1, the batch size of the next epoch;
- :mod:`.adaptive`: what DBA and EDBA share (a wrapped SGD / Adam / AdamW, the batch-size state);
- :mod:`.dba`: DBA; :mod:`.edba`: EDBA, the last layer only: random candidate subsets judged by a margin loss;
- :mod:`.factory`: an optimizer from its name.

This layer sits below the engine: it knows tasks (their ``per_sample_loss``) and torch, nothing
above. The engine calls ``compute_gradients`` instead of ``loss.backward()`` when an optimizer has
it, and ``next_batch_size`` after each epoch. Names are imported on first use.
"""

import importlib

_EXPORTS = {"DBA": "dba", "EDBA": "edba", "margin_loss": "edba", "batch_size_rule": "batch_size", "per_sample_gradients": "per_sample",
            "layer_groups": "per_sample", "linear_per_sample": "per_sample", "select_strides": "selection", "STRATEGIES": "names",
            "OPTIMIZERS": "names", "parse_optimizer": "names", "build_optimizer": "factory", "AdaptiveOptimizer": "adaptive"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
