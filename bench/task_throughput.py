"""Pretraining speed and memory per task: MAE, DINO, SimCLR, Barlow Twins, query-box and their cyclic mixes.

Every task runs on the same backbone as the bundles (ViT-Tiny: embed 192, depth 12, 3 heads,
global attention at MedMNIST sizes) with the bundles' heads and views:

- MAE: mask ratio 0.75, decoder 96 wide / 2 blocks, normalised pixel loss;
- DINO: 2 global crops + 4 local crops at half the edge, 4096 prototypes, EMA teacher (its
  update is part of the step);
- SimCLR (projector 1024 -> 128) and Barlow Twins (projector 1024 -> 1024 -> 1024): 2 views;
- query-box (issue #15): 10 boxes per image cropped to half the edge, 3 queries per box, crops
  encoded without gradient, a 2-block cross-attention decoder, Hungarian matching;
- MAE+DINO, MAE+box, MAE+DINO+box: alternating, one per step (samples/s over whole cycles).

Two figures per task: **model samples/s** (a training step on ready views, median of rounds,
tasks alternating round by round) and the **view pipeline's time per sample** (MONAI transforms
making that task's views from one image in one process; it runs in the loader's workers, so with
enough workers it overlaps the model). Peak memory is the peak RSS of three steps in a fresh
subprocess, as in ``pretrain_throughput.py``. bf16 autocast where the CPU has it.

Configs: 2D 28x28 patch 4 batch 64; 3D 28^3 patch 4 batch 16.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings

import torch

from pretrain_throughput import _autocast, bench_args, peak_rss_mb, probe
from report import publish

warnings.filterwarnings("ignore")

CONFIGS = {"2D 28 p4": (2, 28, 4, 64), "3D 28 p4": (3, 28, 4, 16)}
TASKS = ("mae", "dino", "simclr", "barlow", "mae+dino", "box", "mae+box", "mae+dino+box")


def build(task: str, dims: int, size: int, patch: int):
    """(MultiTask, per-task view pipelines) as the bundles configure them."""
    from medssl.data.views import multi_crop, query_boxes, two_views
    from medssl.engine import MultiTask
    from medssl.models import ViT
    from medssl.data.block_masks import jepa_blocks
    from medssl.tasks import BarlowTwinsTask, BYOLTask, DINOTask, IJEPATask, MAETask, QueryBoxTask, SimCLRTask, SwAVTask

    torch.manual_seed(0)
    vit = ViT(dims, 1, patch_size=patch, size="tiny")
    local = max(patch, size // 2 // patch * patch)
    make = {
        "mae": lambda: (MAETask(vit, mask_ratio=0.75), None),
        "dino": lambda: (DINOTask(vit, out_dim=4096), multi_crop(dims, size, local, n_local=4, modality="CT")),
        "simclr": lambda: (SimCLRTask(vit), two_views(dims, size, modality="CT")),
        "simclr_drop": lambda: (SimCLRTask(vit, token_drop=0.5), two_views(dims, size, modality="CT")),
        "barlow": lambda: (BarlowTwinsTask(vit), two_views(dims, size, modality="CT")),
        "byol": lambda: (BYOLTask(vit), two_views(dims, size, modality="CT")),
        "swav": lambda: (SwAVTask(vit), two_views(dims, size, modality="CT")),
        "ijepa": lambda: (IJEPATask(vit, predictor_depth=4), jepa_blocks(patch)),
        "box": lambda: (QueryBoxTask(vit, queries_per_box=3, max_boxes=10),  # the bundles' defaults
                        query_boxes(dims, local, n_boxes=10, min_size=2 * patch, modality="CT")),
    }
    parts = [make[name]() for name in task.split("+")]
    return MultiTask([t for t, _ in parts]), [v for _, v in parts]


def batches(views, dims: int, size: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, *[size] * dims, generator=g)
    out = []
    for view in views:
        if view is None:
            out.append({"image": images})
            continue
        view.set_random_state(seed=0)
        items = [view({"image": img}) for img in images]
        out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out


def view_ms(views, dims: int, size: int, reps: int = 8) -> float:
    """Milliseconds per sample to make the views of one step's task (mean over a task cycle)."""
    img = torch.rand(1, *[size] * dims)
    costs = []
    for view in views:
        if view is None:
            costs.append(0.0)
            continue
        view.set_random_state(seed=0)
        view({"image": img})
        t = time.perf_counter()
        for _ in range(reps):
            view({"image": img})
        costs.append((time.perf_counter() - t) / reps * 1000)
    return sum(costs) / len(costs)


def stepper(model, task_batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctx, _ = _autocast()
    state = {"i": 0}

    def step():
        state["i"] += 1
        batch = task_batches[(state["i"] - 1) % len(task_batches)]
        model.step_start(0.5)
        with ctx:
            loss = model(batch, state["i"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.step_end(0.5)
    return step


def samples_per_second(step, batch: int, rounds: int = 3) -> float:
    """Training samples/s of ``step`` (one optimizer step on ``batch`` samples): median of ``rounds`` x 2 steps, after 2 warm-up steps."""
    step(), step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step(), step()
        times.append(time.perf_counter() - start)
    return 2 * batch / statistics.median(times)


def memory_probe(spec: str) -> dict:
    task, dims, size, patch, n = json.loads(spec)
    model, views = build(task, dims, size, patch)
    return {"peak_mb": peak_rss_mb(stepper(model, batches(views, dims, size, n)), 2 * len(views))}


def main() -> None:
    args = bench_args(__doc__, memory_probe, steps=6)  # 6 steps per round: whole cycles of 2- and 3-task mixes
    torch.set_num_threads(os.cpu_count() or 1)
    _, dtype = _autocast()
    precision = str(dtype).replace("torch.", "") if dtype else "float32"
    rows = []
    for name, (dims, size, patch, n) in CONFIGS.items():
        built = {t: build(t, dims, size, patch) for t in TASKS}
        steps = {t: stepper(m, batches(v, dims, size, n)) for t, (m, v) in built.items()}
        for fn in steps.values():
            fn(), fn()  # warm-up
        times = {t: [] for t in TASKS}
        for _ in range(args.rounds):
            for t, fn in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[t].append(time.perf_counter() - start)
        torch.set_num_threads(1)  # a loader worker runs the views single-threaded
        data = {t: view_ms(v, dims, size) for t, (_, v) in built.items()}
        torch.set_num_threads(os.cpu_count() or 1)
        for t in TASKS:
            speed = n * args.steps / statistics.median(times[t])
            mem = probe([t, dims, size, patch, n], __file__)
            rows.append((name, n, t, speed, data[t], mem))
            print(f"{name:9} {t:9} {speed:8.1f} samples/s  views {data[t]:6.2f} ms/sample  peak {mem:7.0f} MB", flush=True)
    mae = {r[0]: r[3] for r in rows if r[2] == "mae"}
    table = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, autocast {precision}; ViT-Tiny "
             f"(192/12/3), global attention. Median of {args.rounds} rounds x {args.steps} steps, tasks alternating.", "",
             "| config | batch | task | model samples/s | vs MAE | views (ms/sample, 1 worker) | peak memory (MB) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    table += [f"| {c} | {n} | {t} | {s:.1f} | {s / mae[c]:.2f}x | {v:.2f} | {m:.0f} |" for c, n, t, s, v, m in rows]
    publish("\n".join(table), "task_throughput", args.markdown)


if __name__ == "__main__":
    main()
