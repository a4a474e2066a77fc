"""Efficient DBA (the second source document's "ongoing work": AAAI 2023 student abstract; no public code).

What the source says, and how each point is read here:

- *per-sample selection at the last layer only*: the network trains by one ordinary backward
  pass; the last linear layer's per-sample gradients come for free from its input and output
  gradient (:func:`~.per_sample.linear_per_sample`), and only that layer's gradient is replaced;
- *random candidate sampling*: ``candidates`` random subsets of the batch (each of a random size
  between ``min_fraction`` of the batch and all of it) plus the whole batch itself;
- *a margin loss minimised*: each candidate's mean last-layer gradient is tried as one look-ahead
  step of size lr, ``W - lr * g_S``, and the batch's logits under it scored by the multi-class hinge
  :func:`margin_loss`; the candidate with the lowest is kept (the whole batch on ties, so EDBA never
  judges its update worse than the plain one);
- *batch size from the metric's variation*: after each epoch, the relative fall of the epoch's mean
  margin loss: under ``plateau`` (it stopped improving: the estimate is too noisy to make progress)
  the batch grows by ``delta``; over ``fast`` (it improves quickly: smaller batches give more steps) it
  shrinks by ``delta``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adaptive import AdaptiveOptimizer
from .per_sample import linear_per_sample

__all__ = ["EDBA", "margin_loss", "last_linear"]


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, balanced: bool = False) -> torch.Tensor:
    """Multi-class hinge ``max(0, margin - (z_y - max_{c != y} z_c))``, mean over samples; ``logits`` ``(..., B, C)``.

    ``balanced``: the mean over the classes present of each class's mean, so a minority class
    weighs as much as the majority (few labels are rarely balanced ones).
    """
    labels = labels.long().view(-1)
    true = logits.gather(-1, labels.view(*([1] * (logits.ndim - 2)), -1, 1).expand(*logits.shape[:-1], 1)).squeeze(-1)
    others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[-1]).bool(), -torch.inf).amax(-1)
    hinge = torch.relu(margin - (true - others))
    if not balanced:
        return hinge.mean(-1)
    onehot = nn.functional.one_hot(labels, logits.shape[-1]).to(hinge.dtype)  # (B, C)
    counts = onehot.sum(0)
    present = counts > 0
    per_class = (hinge @ onehot)[..., present] / counts[present]
    return per_class.mean(-1)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` registered in ``model`` (a classifier's head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"EDBA selects on the last linear layer; {type(model).__name__} has none")
    return found[-1]


class EDBA(AdaptiveOptimizer):
    """EDBA around ``optimizer``, selecting on ``model``'s last linear layer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, candidates: int = 16, min_fraction: float = 0.25,
                 margin: float = 1.0, batch_size: int = 64, min_batch_size: int = 8, max_batch_size: int = 512, delta: int = 8,
                 plateau: float = 0.01, fast: float = 0.1, balanced: bool = False) -> None:
        if candidates < 1 or not 0 < min_fraction <= 1:
            raise ValueError(f"need candidates >= 1 and 0 < min_fraction <= 1, got {candidates}, {min_fraction}")
        super().__init__(optimizer, batch_size, min_batch_size, max_batch_size, delta)
        self.candidates, self.min_fraction, self.margin, self.plateau, self.fast = candidates, min_fraction, margin, plateau, fast
        self.balanced = balanced
        self.layer_name, self.layer = last_linear(model)
        self.previous: float | None = None  # the last finished epoch's mean margin loss
        self._seen: dict[str, torch.Tensor] = {}
        self.layer.register_forward_hook(self._keep_input)

    def _keep_input(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._seen["input"] = inputs[0].detach()
            output.register_hook(lambda g: self._seen.__setitem__("grad_output", g.detach()))

    def _lr(self) -> float:
        for group in self.param_groups:
            if any(p is self.layer.weight for p in group["params"]):
                return float(group["lr"])
        raise ValueError(f"the last linear layer {self.layer_name!r} is not among the optimizer's parameters")

    def compute_gradients(self, task: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """One backward pass; then the last layer's gradient is the best candidate subset's mean per-sample gradient."""
        self._seen.clear()
        out = task(batch)
        out["loss"].backward()
        if "grad_output" not in self._seen:
            return out  # the batch had no labelled item (or the head took no part): nothing to select
        labels = torch.as_tensor(batch[getattr(task, "label_key", "label")], device=out["loss"].device).long().view(-1)
        labelled = torch.nonzero(labels >= 0).flatten()
        a, go = self._seen["input"].float(), self._seen["grad_output"].float()
        if a.ndim != 2 or len(a) != len(labels):
            raise ValueError(f"EDBA needs the last layer to see one vector per sample; {self.layer_name!r} got {tuple(a.shape)}")
        a, go, y = a[labelled], go[labelled], labels[labelled]
        n = len(y)
        self.saw_batch(len(labels))
        dw, db = linear_per_sample(a, go, scale=n)  # each labelled sample's own gradient
        masks = [torch.ones(n, device=a.device)]
        for _ in range(self.candidates):
            size = int(torch.randint(max(1, math.ceil(self.min_fraction * n)), n + 1, ()))
            mask = torch.zeros(n, device=a.device)
            mask[torch.randperm(n, device=a.device)[:size]] = 1
            masks.append(mask)
        weights = torch.stack(masks)
        weights = weights / weights.sum(1, keepdim=True)  # (R, n): each candidate's mean
        gw = torch.einsum("rn,noi->roi", weights, dw)
        gb = torch.einsum("rn,no->ro", weights, db)
        w, b = self.layer.weight.detach().float(), self.layer.bias.detach().float() if self.layer.bias is not None else 0
        lr = self._lr()
        ahead = a @ w.T + b - lr * (torch.einsum("ni,roi->rno", a, gw) + (gb[:, None] if self.layer.bias is not None else 0))
        scores = margin_loss(ahead, y, self.margin, self.balanced)
        best = int(torch.argmin(scores))
        self.layer.weight.grad = gw[best].to(self.layer.weight.dtype)
        if self.layer.bias is not None:
            self.layer.bias.grad = gb[best].to(self.layer.bias.dtype)
        self.epoch_values.append(float(scores[best]))
        out = dict(out)
        out["margin"] = scores[best].detach()
        out["selected"] = torch.tensor(float((weights[best] > 0).sum()))
        return out

    def _decide(self) -> tuple[int, float]:
        current = sum(self.epoch_values) / len(self.epoch_values)
        size = self.current
        if self.previous is not None:
            fall = (self.previous - current) / max(abs(self.previous), 1e-12)
            if fall < self.plateau:
                size += self.delta
            elif fall > self.fast:
                size -= self.delta
        self.previous = current
        return int(min(self.max_batch_size, max(self.min_batch_size, size))), current

    def _extra_state(self) -> dict:
        return {"previous": self.previous}

    def _load_extra_state(self, state: dict) -> None:
        self.previous = state.get("previous")
