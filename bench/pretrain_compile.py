"""What ``torch.compile`` adds to medssl's MAE step, against MONAI's MAE in bf16 (issue #3's open lever).

The models and batches are those of ``pretrain_throughput.py`` part 1 (same size, same loss,
bf16 autocast; MONAI with the one-line fix that lets it run under autocast). Three models take
turns round by round in one process: medssl eager, medssl with the whole MAE task compiled
(``nn.Module.compile()``, TorchInductor, default mode) and MONAI. The compile column is the wall
time of the first three compiled steps (compilation plus three steps).

The trainer does not compile: a task's forward reads its training progress (DINO's teacher
temperature, frozen prototypes), a Python float that changes every step and would make TorchDynamo
recompile every step; compiling only the transformer blocks keeps shapes and floats out of the
graph but gains little (measured 1.03x in 2D 28 p4).
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from pretrain_throughput import CONFIGS, alternate, batch_for, bench_args, build, step_fn
from report import publish

warnings.filterwarnings("ignore")


def main() -> None:
    args = bench_args(__doc__, None, steps=3)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for name, (dims, size, patch, n) in CONFIGS.items():
        batch = batch_for(dims, size, n)
        models = {k: build(k, dims, size, patch) for k in ("medssl", "monai")}
        torch._dynamo.reset()  # each configuration compiles afresh, as a training run would
        compiled = build("medssl", dims, size, patch)
        compiled.compile()
        start = time.perf_counter()
        step = step_fn(compiled, batch)
        for _ in range(3):
            step()
        compile_s = time.perf_counter() - start
        models["medssl compiled"] = compiled
        speed = alternate(models, batch, args.rounds, args.steps)
        rows.append((name, n, speed, compile_s))
        print(f"{name:9} " + "  ".join(f"{k} {v:7.1f}" for k, v in speed.items()) + f" samples/s; compile {compile_s:.0f} s",
              flush=True)
    table = [f"{os.cpu_count()} cores, bf16 autocast where supported. Median of {args.rounds} rounds x {args.steps} steps, "
             "models alternating.", "",
             "| config | batch | medssl eager | medssl compiled | MONAI (bf16) | compiled / eager | compiled / MONAI | eager / MONAI | compile + 3 steps (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, n, s, c in rows:
        eager, comp, monai = s["medssl"], s["medssl compiled"], s["monai"]
        table.append(f"| {name} | {n} | {eager:.1f} | {comp:.1f} | {monai:.1f} | {comp / eager:.2f}x | {comp / monai:.2f}x | "
                     f"{eager / monai:.2f}x | {c:.0f} |")
    publish("\n".join(table), "pretrain_compile", args.markdown)


if __name__ == "__main__":
    main()
