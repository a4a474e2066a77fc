"""The evaluation protocol: methods x poolings x label fractions x seeds, baselines in the same run.

For every seed and label fraction the same stratified training subset (every class present) is
given to every method, so each row of the final table compares like with like:

- ``probe`` / ``knn`` on frozen features of the pretrained encoder, per pooling (features are
  computed once per pooling);
- ``finetune``: the pretrained encoder and a linear head trained end to end (layer-wise LR decay);
- baselines: ``scratch`` (the same ViT, random init, same loop), ``resnet18`` (MONAI, 2D or 3D),
  ``pixels`` (the linear probe on raw pixels), ``random`` (probe and kNN, rows ``random-probe`` /
  ``random-knn``, on the frozen features of the same encoder randomly initialised: what every
  pretrained encoder must beat).

Results are reported on the ``test`` split when the data has one, else on ``val``. Nothing is
tuned on the reported split: the probe's C comes from cross-validation on the training subset, and
early stopping uses ``val`` when a test split exists, else a stratified 20 % of the training subset.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..models.base import embed
from .fractions import stratified_subset
from .journal import Journal
from .knn import knn_scores
from .metrics import METRICS, classification_metrics
from .probe import linear_probe_scores
from ..tasks.classify import ClassificationTask
from .supervised import train_classifier

__all__ = ["EvalPlan", "run_evaluation", "aggregate", "markdown_table", "write_reports"]

FROZEN = ("probe", "knn")
TRAINED = ("finetune", "scratch", "resnet18")
BASELINES = ("scratch", "resnet18", "pixels", "random")


@dataclass(frozen=True)
class EvalPlan:
    """What to run. Defaults follow issue #4 (1/10/100 % labels, 3 seeds, k=20)."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: int = 3
    methods: tuple[str, ...] = ("probe", "knn", "finetune")
    baselines: tuple[str, ...] = BASELINES
    poolings: tuple[str, ...] = ("cls", "mean", "flatten")
    k: int = 20
    finetune_pooling: str = "cls"
    epochs: int = 30  # fine-tuning / from-scratch epochs (early stopping usually ends sooner)
    patience: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"  # of fine-tuning and the trained baselines: adamw, sgd, adam, dba[-sgd|-adam], edba[-...]
    dba_strategy: str = "variance_norm"
    class_weight: str = "balanced"  # fine-tuning / trained baselines: balanced (inverse class frequency) | none

    def __post_init__(self):
        unknown = (set(self.methods) - {*FROZEN, "finetune"}) | (set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown methods/baselines {sorted(unknown)}")
        from ..optim.names import STRATEGIES, parse_optimizer

        parse_optimizer(self.optimizer)
        from ..tasks.classify import CLASS_WEIGHTS

        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class_weight {self.class_weight!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
        if self.dba_strategy not in STRATEGIES:
            raise ValueError(f"unknown DBA strategy {self.dba_strategy!r}; choose one of {', '.join(STRATEGIES)}")

    def optimizer_for(self, method: str) -> tuple[str, dict]:
        """The optimizer ``method`` trains with, and its options. DBA needs per-sample gradients, which
        the ResNet-18's batch norm does not have: that baseline trains with DBA's inner optimizer."""
        from ..optim.names import parse_optimizer

        wrapper, inner = parse_optimizer(self.optimizer)
        if wrapper == "dba" and method == "resnet18":
            return inner, {}
        return self.optimizer, ({"strategy": self.dba_strategy} if wrapper == "dba" else {})


@torch.no_grad()
def _features(encoder, images: torch.Tensor, pooling: str, batch_size: int = 256) -> np.ndarray:
    encoder.eval()
    return torch.cat([embed(encoder, images[i:i + batch_size], pooling).float() for i in range(0, len(images), batch_size)]).numpy()


def _stop_split(idx: np.ndarray, labels: np.ndarray, seed: int, splits: dict) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Training indices and the early-stopping set (val when a test split exists, else 20 % of the subset)."""
    if "test" in splits:
        return idx, *splits["val"]
    if len(idx) < 10:
        return idx, splits["train"][0][idx], splits["train"][1][idx]  # too few to hold out: stop on training fit
    hold = idx[stratified_subset(labels[idx], 0.2, seed=seed + 1000)]
    rest = np.setdiff1d(idx, hold)
    return rest, splits["train"][0][hold], splits["train"][1][hold]


def run_evaluation(make_encoder: Callable[[bool], torch.nn.Module], splits: dict, plan: EvalPlan = EvalPlan(),
                   device: str | torch.device = "cpu", progress: bool = True, journal: Journal | None = None) -> dict:
    """Run ``plan``. ``make_encoder(pretrained)`` returns a fresh encoder (pretrained weights or random init).

    With a :class:`~medssl.eval.journal.Journal`, each result is appended as it finishes and
    results already in it are not computed again (a killed evaluation resumes).
    """
    journal = journal or Journal(None, {})
    from tqdm.auto import tqdm

    report = "test" if "test" in splits else "val"
    xtr, ytr = splits["train"]
    xrep, yrep = splits[report]
    ytr_np, yrep_np = ytr.numpy(), yrep.numpy()
    num_classes = int(max(ytr.max(), yrep.max())) + 1
    spatial_dims = xtr.ndim - 2
    frozen = [m for m in plan.methods if m in FROZEN]
    feats, random_feats = {}, {}
    frozen_done = all((m, p, float(f), s) in journal.done for m in frozen for p in plan.poolings
                      for f in plan.fractions for s in range(plan.seeds))
    if frozen and not frozen_done:
        encoder = make_encoder(True).to(device)
        for p in plan.poolings:
            feats[p] = (_features(encoder, xtr.to(device), p), _features(encoder, xrep.to(device), p))
            if not all(np.isfinite(f).all() for f in feats[p]):
                raise ValueError("the encoder gives non-finite features: its weights have diverged (NaN/inf); "
                                 "pretrain again with a lower learning rate")
    random_methods = [f"random-{m}" for m in (frozen or FROZEN)] if "random" in plan.baselines else []
    random_done = all((m, p, float(f), s) in journal.done for m in random_methods for p in plan.poolings
                      for f in plan.fractions for s in range(plan.seeds))
    if random_methods and not random_done:
        torch.manual_seed(0)  # the same random encoder for every pooling and seed
        encoder = make_encoder(False).to(device)
        for p in plan.poolings:
            random_feats[p] = (_features(encoder, xtr.to(device), p), _features(encoder, xrep.to(device), p))
    pixels = (xtr.flatten(1).numpy(), xrep.flatten(1).numpy())
    per_run = (len(frozen) + len(random_methods)) * len(plan.poolings) + ("finetune" in plan.methods) \
        + len([b for b in plan.baselines if b != "random"])
    bar = tqdm(total=plan.seeds * len(plan.fractions) * per_run, desc="evaluation plan", unit="run", disable=not progress)
    records = []

    # Frozen-feature methods are deterministic given the label subset (unshuffled CV folds, lbfgs,
    # exact kNN), and the 100 % subset is the same at every seed: each is computed once.
    by_subset: dict[tuple, tuple] = {}

    def run(method, pooling, fraction, seed, compute, subset: np.ndarray | None = None, extra: dict | None = None):
        """``compute() -> (n_train, scores)`` unless the journal already has this result (or, for a
        deterministic method, ``subset`` was already evaluated at another seed)."""
        done = journal.done.get((method, pooling, float(fraction), seed))
        if done is None:
            key = None if subset is None else (method, pooling, subset.tobytes())
            if key in by_subset:
                n_train, scores = by_subset[key]
            else:
                n_train, scores = compute()
                if key is not None:
                    by_subset[key] = (n_train, scores)
            done = {"method": method, "pooling": pooling, "fraction": fraction, "seed": seed, "split": report,
                    "n_train": int(n_train), **classification_metrics(yrep_np, scores), **(extra or {})}
            journal.add(done)
        records.append(done)
        bar.update(1)

    for seed in range(plan.seeds):
        for fraction in plan.fractions:
            idx = stratified_subset(ytr_np, fraction, seed=seed)
            for method in frozen + random_methods:
                for p in plan.poolings:
                    def frozen_scores(method=method, p=p, idx=idx, seed=seed):
                        ftr, frep = (random_feats if method.startswith("random-") else feats)[p]
                        if method.endswith("probe"):
                            return len(idx), linear_probe_scores(ftr[idx], ytr_np[idx], frep, seed=seed)[0]
                        return len(idx), knn_scores(ftr[idx], ytr_np[idx], frep, k=plan.k, num_classes=num_classes)
                    run(method, p, fraction, seed, frozen_scores, subset=idx)
            if "pixels" in plan.baselines:
                run("pixels", "-", fraction, seed,
                    lambda idx=idx, seed=seed: (len(idx), linear_probe_scores(pixels[0][idx], ytr_np[idx], pixels[1], seed=seed)[0]),
                    subset=idx)
            trained = [m for m in ("finetune",) if m in plan.methods] + [m for m in ("scratch", "resnet18") if m in plan.baselines]
            for method in trained:
                def supervised_scores(method=method, idx=idx, seed=seed):
                    torch.manual_seed(seed)
                    if method == "resnet18":
                        from monai.networks.nets import resnet18

                        model = ClassificationTask(resnet18(spatial_dims=spatial_dims, n_input_channels=xtr.shape[1],
                                                            num_classes=num_classes), num_classes, pooling=None)
                    else:
                        model = ClassificationTask(make_encoder(method == "finetune"), num_classes, pooling=plan.finetune_pooling)
                    train_idx, stop_x, stop_y = _stop_split(idx, ytr_np, seed, splits)
                    optimizer, options = plan.optimizer_for(method)
                    train_classifier(model, xtr[train_idx], ytr[train_idx], stop_x, stop_y, epochs=plan.epochs,
                                     batch_size=plan.batch_size, lr=plan.lr, patience=plan.patience, seed=seed,
                                     layer_decay=0.75 if method == "finetune" else None, device=device,
                                     optimizer=optimizer, optimizer_options=options, class_weight=plan.class_weight)
                    return len(train_idx), model.predict(xrep)
                run(method, plan.finetune_pooling if method != "resnet18" else "-", fraction, seed, supervised_scores,
                    extra={"optimizer": plan.optimizer_for(method)[0]})
    bar.close()
    return {"split": report, "plan": asdict(plan), "records": records, "table": aggregate(records)}


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, pooling, fraction)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["pooling"], r["fraction"]), []).append(r)
    rows = []
    for (method, pooling, fraction), rs in groups.items():
        row = {"method": method, "pooling": pooling, "fraction": fraction, "seeds": len(rs)}
        for m in METRICS:
            values = np.array([r[m] for r in rs], dtype=float)
            row[m] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
            row[f"{m}_std"] = float(np.nanstd(values)) if not np.isnan(values).all() else float("nan")
        rows.append(row)
    return rows


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(table: list[dict], metric: str, fractions: list[float], columns: tuple[str, ...]) -> list[str]:
    """Lines of a markdown table: one row per distinct ``columns`` value, ``metric`` mean ± std per fraction."""
    lines = ["| " + " | ".join(columns) + " | " + " | ".join(f"{f:g} labels" for f in fractions) + " |",
             "|" + "---|" * len(columns) + "---:|" * len(fractions)]
    for key in dict.fromkeys(tuple(r[c] for c in columns) for r in table):
        cells = {r["fraction"]: _fmt(r[metric], r[f"{metric}_std"]) for r in table if tuple(r[c] for c in columns) == key}
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells.get(f, "") for f in fractions) + " |")
    return lines


def write_reports(result: dict, out: str | os.PathLike, title: str = "") -> list[Path]:
    """``results.json`` (records + table), ``results.md`` (one table per metric), ``results.png`` (metric vs fraction)."""
    from ..viz.figure import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    table = result["table"]
    fractions = sorted({r["fraction"] for r in table})
    lines = [f"# {title or 'Evaluation'}", "", f"Reported on the **{result['split']}** split; mean ± std over "
             f"{result['plan']['seeds']} seeds; same label subsets for every row.", ""]
    trained = sorted({r["optimizer"] for r in result["records"] if "optimizer" in r})
    if trained:
        weights = result["plan"].get("class_weight", "none")  # results written before class weights existed had none
        lines += [f"Fine-tuning and trained baselines: {', '.join(trained)} (batch size {result['plan'].get('batch_size', 64)}"
                  f"{', adapted per epoch' if any(o.startswith(('dba', 'edba')) for o in trained) else ''}; "
                  f"{'class-balanced' if weights == 'balanced' else 'plain'} cross-entropy).", ""]
    for metric in METRICS:
        lines += [f"## {metric}", "", *markdown_table(table, metric, fractions, ("method", "pooling")), ""]
    (out / "results.md").write_text("\n".join(lines))

    from ..viz.curves import fraction_curves

    series = []
    for key in dict.fromkeys((r["method"], r["pooling"]) for r in table):
        label = key[0] if key[1] == "-" else f"{key[0]} ({key[1]})"
        series.append((label, [r for r in table if (r["method"], r["pooling"]) == key], key[0] in BASELINES or key[0].startswith("random-")))
    fig = fraction_curves([("", series)], METRICS, result["split"], title)
    return [out / "results.json", out / "results.md", save_figure(fig, out / "results.png")]


def evaluate_checkpoint(build_network: Callable[[], torch.nn.Module], checkpoint: str | os.PathLike, data: str | os.PathLike,
                        out: str | os.PathLike, spatial_dims: int, size: int, channels: int = 1, ct_window="abdomen",
                        plan: EvalPlan | None = None, progress: bool = True, recorded: dict | None = None,
                        title: str = "") -> list[Path]:
    """The whole evaluation of one encoder checkpoint on labelled ``data``; returns the report files.

    ``build_network()`` makes a fresh encoder (the pretrained one gets ``checkpoint``'s weights,
    the from-scratch baseline stays random). ``recorded`` is what the reports say about the
    checkpoint and data (default: their paths). A killed run started again skips what is done
    (``out/records.jsonl``). This is ``medssl evaluate`` and each bundle's ``evaluate.yaml``.
    """
    from .features import load_encoder
    from .labelled import load_labelled

    ckpt = Path(checkpoint).resolve()
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    splits = load_labelled(data, spatial_dims=spatial_dims, size=size, channels=channels, ct_windows=ct_window)

    def make_encoder(pretrained: bool):
        net = build_network()
        return load_encoder(net, ckpt) if pretrained else net

    plan = plan or EvalPlan()
    recorded = recorded or {"checkpoint": str(ckpt), "data": str(Path(data).resolve())}
    header = {k: recorded[k] for k in ("checkpoint", "data") if k in recorded}  # what a resumed run must match
    journal = Journal(Path(out) / "records.jsonl", {**header, "plan": asdict(plan)})
    result = run_evaluation(make_encoder, splits, plan, progress=progress, journal=journal)
    result.update(**recorded)
    return write_reports(result, out, title=title or f"{ckpt.name} on {Path(data).name}")
