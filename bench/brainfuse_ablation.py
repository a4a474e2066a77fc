"""The second source document's BrainFuse ablation on a MedMNIST set (issue #16).

Rows (the source's table): NT (normal training: supervised cross-entropy), NT + BT (Barlow Twins on
the same images), NT + BT + BrainFuse (latent fusion), NT + BT + RawBrainFuse, and each of the last
two with consistency regularisation. Every row trains the same encoder from scratch for the same
number of steps on the same labelled subset (1 / 10 / 100 % of the train split, stratified, per
seed), every task summed on every step (``schedule="sum"``: the supervised task gets every step in
every row), and is scored on the val split: accuracy, balanced accuracy, AUC. Paired differences
are against NT + BT on the same seed and subset.

Each finished run is written to ``OUT/runs/<fraction>_<seed>_<row>.json`` at once; a rerun with the
same ``--out`` skips them (``--resume`` is the default), so a stopped session loses nothing.

    python bench/brainfuse_ablation.py --data ../shared/data/medmnist/pneumoniamnist_28_trainval.npz \\
        --out /work/runs/bf16_pneumonia --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROWS = {
    "NT": dict(tasks=["classify"]),
    "NT + BT": dict(tasks=["classify", "barlow"]),
    "NT + BT + BrainFuse": dict(tasks=["classify", "barlow", "brainfuse"], space="latent", consistency=0.0),
    "NT + BT + RawBrainFuse": dict(tasks=["classify", "barlow", "raw_brainfuse"], space="raw", consistency=0.0),
    "NT + BT + BrainFuse + CR": dict(tasks=["classify", "barlow", "brainfuse"], space="latent", consistency=1.0),
    "NT + BT + RawBrainFuse + CR": dict(tasks=["classify", "barlow", "raw_brainfuse"], space="raw", consistency=1.0),
}
SLUG = {name: name.lower().replace(" + ", "_").replace(" ", "") for name in ROWS}


class _Items(torch.utils.data.Dataset):
    def __init__(self, x, y, name):
        self.x, self.y, self.name = x, y, name

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i]), "patient": f"{self.name}:{i}", "modality": "XR" if self.x.ndim == 4 else "CT"}


def _vit(d: int, args):
    from medssl.models import ViT

    return ViT(d, in_channels=1, patch_size=args.patch, size="micro", embed_dim=args.dim, depth=args.depth,
               num_heads=args.heads, window_size=0)


def train_generative(x, seed: int, args, path: Path):
    """The source's "generative model training", before the rows: a latent BrainFuse task on an encoder of its own,
    trained as an autoencoder on every training image (no labels) for ``--generative-steps``; kept in ``path``, so
    every row of the seed (and a rerun) fuses with the same model. Returns the task and its final R²."""
    from medssl.engine.lr_schedule import WarmupCosine
    from medssl.tasks import BrainFuseTask

    torch.manual_seed(seed)
    task = BrainFuseTask(_vit(x.ndim - 2, args), n_patients=args.patients, min_generator_quality=float("inf"),
                         detail_transfer=args.detail_transfer, generator_dim=args.generator_dim)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        task.load_state_dict(saved["state"])
        return task, saved["r2"]
    optimizer = torch.optim.AdamW(task.parameters(), lr=args.lr, weight_decay=0.05)
    steps, batch = args.generative_steps, min(64, len(x))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(seed)
    order, r2 = torch.empty(0, dtype=torch.long), []
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(x), generator=g)])
        idx, order = order[:batch], order[batch:]
        out = task({"image": x[idx], "patient": [f"train:{i}" for i in idx.tolist()]})
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        r2.append(float(out["generator_quality"]))
    tmp = path.with_suffix(".tmp")
    torch.save({"state": task.state_dict(), "r2": r2[-1]}, tmp)
    tmp.replace(path)
    return task, r2[-1]


def picture_generative(x, seed: int, args, out: Path) -> Path | None:
    """``OUT/generative_<seed>.png``: four fused val scans of two patients each by the seed's generative model
    (sources, partition, raw fusion, the decoded mix, the decoded mix with detail transfer)."""
    from medssl.viz.panels import write_panels

    path = out / f"generative_{seed}.png"
    if path.exists() or not (out / f"generative_{seed}.pt").exists():
        return None
    task, r2 = train_generative(x, seed, args, out / f"generative_{seed}.pt")
    batch = {"image": x[:8], "patient": [f"val:{i}" for i in range(8)]}
    panels, _ = task.eval().panels(batch, *task.plan(batch, torch.Generator().manual_seed(0), n_fused=4))
    return write_panels(panels, path, title=f"generative model of seed {seed} (R² {r2:.3f}, {args.generative_steps} steps), "
                                            "2 val patients fused")


def run_one(row: str, x, y, val_x, val_y, seed: int, args, generative=None) -> dict:
    from medssl.data.views import two_views
    from medssl.engine import MultiTask, PretrainTrainer, pretrain_loader
    from medssl.engine.lr_schedule import WarmupCosine
    from medssl.eval.metrics import classification_metrics
    from medssl.tasks import BarlowTwinsTask, BrainFuseTask, ClassificationTask

    spec = ROWS[row]
    d = x.ndim - 2
    size = x.shape[-1]
    torch.manual_seed(seed)
    vit = _vit(d, args)
    classes = int(max(int(y.max()), int(val_y.max())) + 1)
    classify = ClassificationTask(vit, classes)
    barlow = BarlowTwinsTask(vit, hidden_dim=args.bt_dim, out_dim=args.bt_dim)
    tasks = {"classify": classify}
    if "barlow" in spec["tasks"]:
        tasks["barlow"] = barlow
    name = next((t for t in spec["tasks"] if "brainfuse" in t), None)
    if name:
        tasks[name] = BrainFuseTask(vit, space=spec["space"], n_patients=args.patients, views=two_views(d, size),
                                    barlow=barlow, classify=classify, consistency_weight=spec["consistency"],
                                    min_generator_quality=args.gate, barlow_weight=args.bt_weight,
                                    generator_trains_encoder=not args.detached_generator,
                                    detail_transfer=args.detail_transfer, generator_dim=args.generator_dim,
                                    generative=generative if spec["space"] == "latent" else None)
    mix = MultiTask(tasks, schedule="sum", seed=seed, loss_weights={"barlow": args.bt_weight})
    views = [two_views(d, size) if t == "barlow" else None for t in tasks]
    batch = min(args.batch_size, len(x))
    loader = pretrain_loader(_Items(x, y, "train"), batch_size=batch, seed=seed, views=views, schedule=mix.schedule)
    epochs = max(1, math.ceil(args.steps / len(loader)))
    optimizer = torch.optim.AdamW(mix.parameters(), lr=args.lr, weight_decay=0.05)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, max(1, total // 20)))
    trainer = PretrainTrainer("cpu", epochs, loader, mix, optimizer, amp=args.amp, clip_grad_norm=3.0, seed=seed,
                              max_bad_steps=total, quiet=True)
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: schedule.step())
    used = []  # share of steps whose latent fused scans were used (the generator gate)
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: used.append(float(e.state.output.get(f"{name}/latent_used", 1.0))) if name else None)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    metrics = classification_metrics(val_y.numpy(), classify.predict(val_x))
    quality = float(tasks[name].generator_quality) if name and spec["space"] == "latent" and generative is None else None
    return {**metrics, "steps": total, "seconds": seconds, "skipped_steps": trainer.skipped_steps, "batch_size": batch,
            "labelled": len(x), "latent_used": float(np.mean(used)) if used else None, "generator_quality": quality}


def summarise(results: dict, fractions, seeds) -> tuple[str, dict]:
    lines = ["| labels | method | accuracy | balanced acc. | AUC | AUC − (NT + BT), paired | s / run |", "|---|---|---|---|---|---|---|"]
    table = {}
    for f in fractions:
        for row in ROWS:
            runs = [results.get((f, s, row)) for s in seeds]
            runs = [r for r in runs if r]
            if not runs:
                continue
            ms = {k: (np.mean([r[k] for r in runs]), np.std([r[k] for r in runs])) for k in ("accuracy", "balanced_accuracy", "auc")}
            base = [(results.get((f, s, row)), results.get((f, s, "NT + BT"))) for s in seeds]
            diffs = [a["auc"] - b["auc"] for a, b in base if a and b]
            diff = f"{np.mean(diffs):+.3f} ({len(diffs)} seeds)" if diffs and row != "NT + BT" else "-"
            table[(f, row)] = {**{k: v[0] for k, v in ms.items()}, "diff_auc": float(np.mean(diffs)) if diffs else float("nan"),
                               "diff_acc": float(np.mean([a["accuracy"] - b["accuracy"] for a, b in base if a and b])) if diffs else float("nan")}
            cells = " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in ms.values())
            lines.append(f"| {f:g} | {row} | {cells} | {diff} | {np.mean([r['seconds'] for r in runs]):.0f} |")
    return "\n".join(lines), table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(SLUG.values()), help="comma-separated row slugs: " + ", ".join(SLUG.values()))
    p.add_argument("--steps", type=int, default=300, help="training steps per run, the same for every row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patients", type=int, default=2, help="patients per fused scan")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--bt-dim", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bt-weight", type=float, default=1.0, help="Barlow Twins loss weight (real and fused samples)")
    p.add_argument("--gate", type=float, default=0.5, help="generator R² before latent fused scans are used")
    p.add_argument("--detached-generator", action="store_true", help="train the latent generator on detached tokens")
    p.add_argument("--detail-transfer", action="store_true",
                   help="latent fused scans keep the sources' detail the generator misses")
    p.add_argument("--generator-dim", type=int, default=None, help="the latent generator's width (default: half the encoder's)")
    p.add_argument("--generative-steps", type=int, default=0,
                   help="train the latent rows' generative model first, on every training image (no labels), for "
                        "this many steps (0: the generator trains inside each run)")
    p.add_argument("--amp", default="off")
    p.add_argument("--markdown", default=None, help="write the table into this file between brainfuse_<dataset> markers")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs of --out, train nothing")
    args = p.parse_args(argv)

    from medssl.eval.fractions import stratified_subset
    from medssl.eval.labelled import load_labelled

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Path(args.data)
    d = 3 if "3d" in data.name else 2
    splits = load_labelled(data, spatial_dims=d, size=28)
    (x, y), (val_x, val_y) = splits["train"], splits["val"]
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [r for r in ROWS if SLUG[r] in args.rows.split(",")]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = {}
    generative_r2 = {}
    for f in fractions:
        for seed in seeds:
            subset = torch.as_tensor(stratified_subset(y.numpy(), f, seed))
            for row in wanted:
                path = out / "runs" / f"{f:g}_{seed}_{SLUG[row]}.json"
                if path.exists():
                    results[(f, seed, row)] = json.loads(path.read_text())
                    continue
                if args.report_only:
                    continue
                generative = None
                if args.generative_steps and ROWS[row].get("space") == "latent":
                    generative, generative_r2[seed] = train_generative(x, seed, args, out / f"generative_{seed}.pt")
                r = run_one(row, x[subset], y[subset], val_x, val_y, seed, args, generative)
                if generative is not None:
                    r["generative_r2"] = generative_r2[seed]
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(r))
                tmp.replace(path)
                results[(f, seed, row)] = r
                print(f"{f:g} seed {seed} {row}: acc {r['accuracy']:.3f} bacc {r['balanced_accuracy']:.3f} "
                      f"auc {r['auc']:.3f} ({r['seconds']:.0f} s, {r['steps']} steps)", flush=True)
    for seed in seeds:
        if args.generative_steps:
            picture_generative(val_x, seed, args, out)
    text, _ = summarise(results, fractions, seeds)
    cmd = "python bench/brainfuse_ablation.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                           if a != "--report-only")
    header = (f"Command: `{cmd}`\n\n{data.name}: train split {len(x)} images ({d}D, 28 px), val {len(val_x)}. Encoder: ViT "
              f"{args.dim}-d, depth {args.depth}, patch {args.patch}, global attention, from scratch; {args.steps} steps per run "
              f"(batch {args.batch_size}, or the subset when smaller), AdamW lr {args.lr}, every task summed on every step; "
              f"fusion of {args.patients} patients; Barlow Twins projector {args.bt_dim}, loss weight {args.bt_weight}; "
              f"generator gate R² {args.gate}, generator {'on detached tokens' if args.detached_generator else 'trains the encoder'}"
              f"{f', width {args.generator_dim}' if args.generator_dim else ''}"
              f"{', detail transfer' if args.detail_transfer else ''}"
              f"{f'; latent rows fuse with a generative model trained first for {args.generative_steps} steps on every training image, no labels' if args.generative_steps else ''}; "
              f"seeds {args.seeds}. "
              f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, amp {args.amp}.\n\n")
    print(header + text)
    if args.markdown:
        marker = f"<!-- brainfuse_{data.stem.split('_')[0]} -->"
        doc = Path(args.markdown)
        body = doc.read_text() if doc.exists() else ""
        block = f"{marker}\n{header}{text}\n{marker}"
        if marker in body:
            a = body.index(marker)
            b = body.index(marker, a + len(marker)) + len(marker)
            body = body[:a] + block + body[b:]
        else:
            body = body.rstrip() + "\n\n" + block + "\n"
        doc.write_text(body)


if __name__ == "__main__":
    main()
