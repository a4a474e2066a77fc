"""Dynamic Batch Adaptation (issue #18): the source's MNIST table on digits, the medical comparison, the cost per step.

Three measurements, each resumable (finished runs are kept in ``--out`` and not run again):

- ``digits``: the second source document's MNIST table, reproduced in shape on scikit-learn's
  ``load_digits`` (8x8, 1,797 images; MNIST itself is not available offline). A one-hidden-layer
  MLP (64-128-10, as the source's single fully connected hidden layer), SGD and Adam at batch
  64 / 128 / 256 against DBA (gradient norm, variance norm) around SGD and Adam, and EDBA around
  SGD, at 100 / 10 / 1 % of the training pool, ``--seeds`` seeds; test accuracy mean ± std.
  A fixed third of the images is the test set; a fifth of the rest stops training early (the
  best epoch's weights are kept, as everywhere in medssl).
- ``medical``: ``medssl evaluate``'s fine-tuning and from-scratch rows with each of
  ``--optimizers`` on one checkpoint and data set (same subsets and seeds), then the paired
  difference of each against the first, per seed.
- ``cost``: seconds and peak memory per training step of DBA and EDBA against the plain
  optimizer, at the bundles' model sizes (each configuration in its own process, so ``ru_maxrss``
  is that configuration's peak).

Examples::

    python bench/dba.py digits --seeds 5 --out runs/dba_digits --markdown docs/benchmarks.md
    python bench/dba.py medical --checkpoint RUN/models/model.pt --data pneumoniamnist_28_trainval.npz \\
        --out runs/dba_pneumonia --seeds 3 --markdown docs/benchmarks.md
    python bench/dba.py cost --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_block  # noqa: E402

DIGITS_VARIANTS = [  # (label, optimizer, batch size, DBA strategy)
    ("SGD, batch 64", "sgd", 64, None), ("SGD, batch 128", "sgd", 128, None), ("SGD, batch 256", "sgd", 256, None),
    ("Adam, batch 64", "adam", 64, None), ("Adam, batch 128", "adam", 128, None), ("Adam, batch 256", "adam", 256, None),
    ("DBA+SGD, gradient norm", "dba-sgd", 64, "gradient_norm"), ("DBA+SGD, variance norm", "dba-sgd", 64, "variance_norm"),
    ("DBA+Adam, gradient norm", "dba-adam", 64, "gradient_norm"), ("DBA+Adam, variance norm", "dba-adam", 64, "variance_norm"),
    ("EDBA+SGD", "edba-sgd", 64, None),
]


def _machine() -> str:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} thread(s)"


def _journal(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["variant"], r["fraction"], r["seed"])] = r
    return done


def digits(args) -> str:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from medssl.eval.fractions import stratified_subset
    from medssl.eval.supervised import train_classifier
    from medssl.tasks import ClassificationTask

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    test = stratified_subset(y.numpy(), 1 / 3, seed=12345)
    pool = np.setdiff1d(np.arange(len(y)), test)
    stop = pool[stratified_subset(y[pool].numpy(), 0.2, seed=54321)]
    train_pool = np.setdiff1d(pool, stop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "digits.jsonl"
    done = _journal(journal)
    fractions = [float(f) for f in args.fractions.split(",")]
    total = len(DIGITS_VARIANTS) * len(fractions) * args.seeds
    count = 0
    for seed in range(args.seeds):
        for fraction in fractions:
            idx = train_pool[stratified_subset(y[train_pool].numpy(), fraction, seed=seed)]
            for label, optimizer, batch, strategy in DIGITS_VARIANTS:
                count += 1
                if (label, fraction, seed) in done:
                    continue
                torch.manual_seed(seed)
                net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
                task = ClassificationTask(net, 10, pooling=None)
                options = {"strategy": strategy} if strategy else {}
                lr = args.sgd_lr if optimizer.endswith("sgd") else args.adam_lr
                started = time.perf_counter()
                result = train_classifier(task, x[idx], y[idx], x[stop], y[stop], epochs=args.epochs, batch_size=batch, lr=lr,
                                          weight_decay=0.0, layer_decay=None, patience=args.patience, warmup_epochs=0, seed=seed,
                                          optimizer=optimizer, optimizer_options=options)
                accuracy = float((task.predict(x[test]).argmax(1) == y[test].numpy()).mean())
                record = {"variant": label, "fraction": fraction, "seed": seed, "n_train": len(idx), "test_accuracy": accuracy,
                          "best_epoch": result["best_epoch"], "batch_sizes": result["batch_sizes"],
                          "seconds": round(time.perf_counter() - started, 2)}
                with open(journal, "a") as f:
                    f.write(json.dumps(record) + "\n")
                done[(label, fraction, seed)] = record
                print(f"[{count}/{total}] {label} at {fraction:g}: {accuracy:.4f} (batch sizes {result['batch_sizes'][0]} -> "
                      f"{result['batch_sizes'][-1]}, {record['seconds']} s)", flush=True)
    sizes = {f: len(train_pool[stratified_subset(y[train_pool].numpy(), f, seed=0)]) for f in fractions}
    lines = [f"load_digits (8x8, {len(y)} images): {len(test)} test, {len(stop)} for early stopping, training pool {len(train_pool)} "
             f"({', '.join(f'{f:.0%}: {n} images' for f, n in sizes.items())}). MLP 64-128-10, {args.epochs} epochs (early stopping, "
             f"patience {args.patience}), SGD lr {args.sgd_lr} (momentum 0.9), Adam lr {args.adam_lr}, no weight decay; DBA stride 4, "
             f"batch size from 64 within [8, 512], delta 8. Test accuracy %, mean ± std over {args.seeds} seeds. "
             f"Machine: {_machine()}.", "",
             "| optimizer | variant | " + " | ".join(f"{f:.0%} of data" for f in fractions) + f" | last batch size ({min(fractions):.0%}) |",
             "|---|---|" + "---:|" * len(fractions) + "---:|"]
    for label, optimizer, _, _ in DIGITS_VARIANTS:
        cells = []
        for f in fractions:
            acc = np.array([done[(label, f, s)]["test_accuracy"] for s in range(args.seeds) if (label, f, s) in done]) * 100
            cells.append(f"{acc.mean():.2f} ± {acc.std():.2f}" if len(acc) else "")
        finals = [done[(label, min(fractions), s)]["batch_sizes"][-1] for s in range(args.seeds) if (label, min(fractions), s) in done]
        name, _, variant = label.partition(", ")
        lines.append(f"| {name} | {variant or '-'} | " + " | ".join(cells) + f" | {np.median(finals):.0f} |" if finals else "")
    if args.picture:
        draw_digits(done, fractions, args.seeds, args.picture)
        lines += ["", f"![DBA on digits: accuracy and batch sizes](images/{Path(args.picture).name})"]
    return "\n".join(lines)


def draw_digits(done: dict, fractions: list[float], seeds: int, path: str) -> None:
    """Test accuracy against the share of data per optimizer, and the batch size per epoch at the smallest share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.viz.figure import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = ["SGD, batch 64", "Adam, batch 64", "DBA+SGD, gradient norm", "DBA+SGD, variance norm", "DBA+Adam, gradient norm",
             "DBA+Adam, variance norm", "EDBA+SGD"]
    xs = sorted(fractions)
    for label in shown:
        acc = [np.mean([done[(label, f, s)]["test_accuracy"] for s in range(seeds) if (label, f, s) in done] or [np.nan]) * 100 for f in xs]
        style = "--" if label.startswith(("SGD", "Adam")) else "-"
        left.plot([f * 100 for f in xs], acc, style, marker="o", label=label)
    left.set_xscale("log")
    left.set_xlabel("% of the training pool")
    left.set_ylabel("test accuracy %")
    left.set_title("load_digits, MLP 64-128-10")
    left.legend(fontsize=7)
    for fraction, style in zip([f for f in sorted(fractions, reverse=True) if f < 1][:1] + [1.0], ["-", ":"]):
        for label, colour in zip(("DBA+SGD, gradient norm", "DBA+SGD, variance norm", "DBA+Adam, gradient norm", "EDBA+SGD"),
                                 ("C2", "C3", "C4", "C6")):
            runs = [done[(label, fraction, s)]["batch_sizes"] for s in range(seeds) if (label, fraction, s) in done]
            if runs:
                length = min(len(r) for r in runs)
                right.plot(range(1, length + 1), np.median([r[:length] for r in runs], axis=0), style, color=colour,
                           label=f"{label}, {fraction:.0%} of the data")
    right.set_xlabel("epoch (until early stopping)")
    right.set_ylabel("batch size (median over seeds)")
    right.set_yscale("log", base=2)
    right.set_title("the batch size DBA / EDBA chose per epoch")
    right.legend(fontsize=7)
    save_figure(fig, path)


def medical(args) -> str:
    from medssl.eval.metrics import METRICS
    from medssl.eval.protocol import EvalPlan
    from medssl.workflows import evaluate

    optimizers = args.optimizers.split(",")
    fractions = tuple(float(f) for f in args.fractions.split(","))
    records = {}
    class_weight = args.class_weight
    for opt in optimizers:
        plan = EvalPlan(fractions=fractions, seeds=args.seeds, methods=("finetune",), baselines=("scratch",), poolings=("cls",),
                        epochs=args.epochs, optimizer=opt, class_weight=class_weight)
        started = time.perf_counter()
        evaluate(args.checkpoint, args.data, Path(args.out) / opt, plan=plan, progress=not args.quiet)
        result = json.loads((Path(args.out) / opt / "results.json").read_text())
        records[opt] = {(r["method"], r["fraction"], r["seed"]): r for r in result["records"]}
        print(f"{opt}: done ({time.perf_counter() - started:.0f} s this call)", flush=True)
    base = optimizers[0]
    name = Path(args.data).name
    run = "/".join(Path(args.checkpoint).parts[-5:-3])  # RUN/<objective> of the bench/objectives.py run that made it
    lines = [f"{name}, the encoder of `{run}` (MAE, ViT-Tiny); "
             f"fine-tuning (`finetune`) and the same ViT from scratch (`scratch`), {args.epochs} epochs with early stopping, batch 64, "
             f"lr 1e-3, class weights {class_weight}, early stopping on the mean of AUC and balanced accuracy; "
             f"DBA: variance norm, stride 4; EDBA: 16 candidates. Mean ± std over {args.seeds} seeds; in brackets the "
             f"difference to {base} paired by seed (wins of {args.seeds}). Machine: {_machine()}.", ""]
    for metric in ("balanced_accuracy", "auc"):
        assert metric in METRICS
        lines += [f"**{metric.replace('_', ' ')}**", "", "| method | optimizer | " + " | ".join(f"{f:g} labels" for f in fractions) + " |",
                  "|---|---|" + "---:|" * len(fractions)]
        for method in ("finetune", "scratch"):
            for opt in optimizers:
                cells = []
                for f in fractions:
                    vals = [records[opt][(method, f, s)][metric] for s in range(args.seeds) if (method, f, s) in records[opt]]
                    cell = f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else ""
                    if opt != base and vals:
                        diffs = [records[opt][(method, f, s)][metric] - records[base][(method, f, s)][metric] for s in range(args.seeds)]
                        cell += f" ({np.mean(diffs):+.3f}, {sum(d > 0 for d in diffs)}/{len(diffs)})"
                    cells.append(cell)
                lines.append(f"| {method} | {opt} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


COST_CONFIGS = [  # (label, spatial dims, image size, patch, ViT size, batch)
    ("2D ViT-tiny, 28 px, patch 4 (MedMNIST evaluation)", 2, 28, 4, "tiny", 64),
    ("2D ViT-tiny, 224 px, patch 16 (mae_xray_2d)", 2, 224, 16, "tiny", 16),
    ("3D ViT-tiny, 28^3, patch 4 (AdrenalMNIST3D evaluation)", 3, 28, 4, "tiny", 16),
    ("3D ViT-tiny, 64^3, patch 8 (mae_ct_3d)", 3, 64, 8, "tiny", 4),
]


def _one_cost(label: str, optimizer: str, steps: int) -> dict:
    import resource

    import torch

    from medssl.models import ViT
    from medssl.optim import build_optimizer
    from medssl.tasks import ClassificationTask

    _, dims, size, patch, vit_size, batch = next(c for c in COST_CONFIGS if c[0] == label)
    torch.manual_seed(0)
    task = ClassificationTask(ViT(spatial_dims=dims, in_channels=1, patch_size=patch, size=vit_size, window_size=0), 2)
    opt = build_optimizer(optimizer, task.parameters(), task, batch_size=batch)
    data = {"image": torch.randn(batch, 1, *(size,) * dims), "label": torch.randint(0, 2, (batch,))}
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "compute_gradients"):
            opt.compute_gradients(task, data)
        else:
            task(data)["loss"].backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - started)
    return {"seconds": float(np.median(times)), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": sum(p.numel() for p in task.parameters())}


def cost(args) -> str:
    optimizers = args.optimizers.split(",")
    lines = [f"Seconds per training step (median of {args.steps}, after one warm-up step) and the process's peak memory, one process "
             f"per cell; ratios against {optimizers[0]} in brackets. Machine: {_machine()}.", "",
             "| model (batch) | parameters | " + " | ".join(optimizers) + " |", "|---|---:|" + "---:|" * len(optimizers)]
    for label, *_rest in COST_CONFIGS:
        cells, base = [], None
        for opt in optimizers:
            out = subprocess.run([sys.executable, __file__, "_cost", "--config", label, "--optimizer", opt, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r
            ratio = "" if r is base else f" ({r['seconds'] / base['seconds']:.2f}x, {r['peak_mb'] / base['peak_mb']:.2f}x)"
            cells.append(f"{r['seconds']:.3f} s, {r['peak_mb']:.0f} MB{ratio}")
            print(label, opt, r, flush=True)
        lines.append(f"| {label} ({_rest[-1]}) | {base['params'] / 1e6:.1f} M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("digits")
    d.add_argument("--out", default="runs/dba_digits")
    d.add_argument("--seeds", type=int, default=5)
    d.add_argument("--fractions", default="1,0.1,0.01")
    d.add_argument("--epochs", type=int, default=100)
    d.add_argument("--patience", type=int, default=20)
    d.add_argument("--sgd-lr", type=float, default=0.01)
    d.add_argument("--adam-lr", type=float, default=1e-3)
    d.add_argument("--picture", help="also draw accuracy and batch sizes into this PNG (docs/images/dba_digits.png)")
    m = sub.add_parser("medical")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--optimizers", default="adamw,dba,edba")
    m.add_argument("--fractions", default="0.01,0.1,1")
    m.add_argument("--seeds", type=int, default=3)
    m.add_argument("--epochs", type=int, default=30)
    m.add_argument("--class-weight", choices=("balanced", "none"), default="balanced", help="fine-tuning loss weights (medssl evaluate's)")
    m.add_argument("--quiet", action="store_true")
    c = sub.add_parser("cost")
    c.add_argument("--optimizers", default="adamw,dba,edba")
    c.add_argument("--steps", type=int, default=5)
    one = sub.add_parser("_cost")
    one.add_argument("--config")
    one.add_argument("--optimizer")
    one.add_argument("--steps", type=int)
    for q in (d, m, c):
        q.add_argument("--markdown", help="write the table into this file (docs/benchmarks.md)")
        q.add_argument("--block", help="marker name of the block (default dba_<what>)")
    args = p.parse_args()
    if args.what == "_cost":
        print(json.dumps(_one_cost(args.config, args.optimizer, args.steps)))
        return
    text = {"digits": digits, "medical": medical, "cost": cost}[args.what](args)
    print("\n" + text)
    if args.markdown:
        block = args.block or f"dba_{args.what}"
        write_block(args.markdown, block, "python bench/dba.py " + " ".join(sys.argv[1:]), text)


if __name__ == "__main__":
    main()
