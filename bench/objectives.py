"""Pretraining objectives at an equal budget (issue #5): MAE, DINO, SimCLR, Barlow Twins, cyclic MAE+DINO.

For one labelled MedMNIST file (train/val), every objective pretrains the same encoder (ViT-Tiny,
the file's own size and patch, global attention, the same batch, learning rate and schedule) on
the training images without their labels, for the same **compute budget**: the budget in minutes
times the objective's measured training speed on this machine gives its number of samples, hence
its epochs. Then each encoder is evaluated with the linear probe and kNN at 1/10/100 % labels
(``medssl evaluate``; the pixels baseline once, beside them), and ``medssl compare`` puts them side by
side. The section written into ``--markdown`` holds the speeds, epochs, wall times, the comparison
table, the plot and the issue's two targets checked on the 1 % AUC.

Everything lands under ``--out`` and a killed run started again resumes: finished pretraining runs
and evaluations are kept, an interrupted pretraining resumes from its last checkpoint, an
interrupted evaluation from its journal.

    python bench/objectives.py --data ../shared/data/medmnist/pneumoniamnist_28_trainval.npz \\
        --out runs/objectives_pneumonia --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_block  # noqa: E402
from task_throughput import batches, build, samples_per_second, stepper  # noqa: E402

# objective -> (label, bundle, settings): MAE, DINO and MAE+DINO share one bundle (mae_dino_ct_3d,
# ``task_names`` picks the tasks), SimCLR and Barlow Twins the other (``method``).
OBJECTIVES = {
    "mae": ("MAE", "mae_dino_ct_3d", {"task_names": ["mae"]}),
    "dino": ("DINO", "mae_dino_ct_3d", {"task_names": ["dino"]}),
    "simclr": ("SimCLR", "simclr_xray_2d", {"method": "simclr"}),
    "simclr_drop": ("SimCLR, half the tokens", "simclr_xray_2d", {"method": "simclr", "token_drop": 0.5}),  # FLIP's dropping
    "barlow": ("Barlow Twins", "simclr_xray_2d", {"method": "barlow"}),
    "mae+dino": ("MAE+DINO", "mae_dino_ct_3d", {"task_names": ["mae", "dino"]}),
    # issue #15: query-box localisation alone and in the source document's mixes (same bundle, task_names)
    "box": ("Box", "mae_dino_ct_3d", {"task_names": ["box"]}),
    "mae+box": ("MAE+Box", "mae_dino_ct_3d", {"task_names": ["mae", "box"]}),
    "mae+dino+box": ("MAE+DINO+Box", "mae_dino_ct_3d", {"task_names": ["mae", "dino", "box"]}),
    # issue #21: the remaining families (distillation, clustering, joint-embedding prediction)
    "byol": ("BYOL", "simclr_xray_2d", {"method": "byol"}),
    "swav": ("SwAV", "simclr_xray_2d", {"method": "swav"}),
    "ijepa": ("I-JEPA", "mae_dino_ct_3d", {"task_names": ["ijepa"]}),
}


def measure_speed(objective: str, dims: int, size: int, patch: int, batch: int, rounds: int = 3) -> float:
    """Training samples/s of ``objective`` at this configuration (median of ``rounds`` x 2 steps)."""
    model, views = build(objective, dims, size, patch)
    return samples_per_second(stepper(model, batches(views, dims, size, batch)), batch, rounds)


def train_size(data: Path) -> int:
    import numpy as np

    with np.load(data, mmap_mode="r") as npz:
        return len(npz["train_images"])


def pretrain_once(objective: str, overrides: dict, out: Path) -> float:
    """Pretrain into ``out`` unless done there; returns the wall seconds of this call."""
    from medssl.atomic import atomic_write
    from medssl.workflows import pretrain
    from medssl.engine.checkpoint import latest_checkpoint

    _, bundle, settings = OBJECTIVES[objective]
    if (out / "done.json").exists():
        return json.loads((out / "done.json").read_text())["seconds"]
    start = time.perf_counter()
    resume = latest_checkpoint(out / "models") is not None
    pretrain(bundle, out, {**overrides, **settings}, resume=resume, progress=False)
    seconds = time.perf_counter() - start
    with atomic_write(out / "done.json", "w") as f:
        f.write(json.dumps({"seconds": seconds, "resumed": resume}) + "\n")
    return seconds


RANDOM = "Random encoder"


def random_as_encoder(comparison: dict) -> dict | None:
    """``comparison`` with the ``random-probe`` / ``random-knn`` baseline rows as an encoder of their own
    (methods ``probe`` / ``knn``), so every objective can be paired against it; None without that baseline."""
    def moved(rows):
        return [dict(r, encoder=RANDOM, method=r["method"][len("random-"):]) for r in rows if str(r["method"]).startswith("random-")]

    table, records = moved(comparison["table"]), moved(comparison.get("records", []))
    if not table:
        return None
    return {**comparison, "encoders": {**comparison["encoders"], RANDOM: {}} if isinstance(comparison["encoders"], dict)
            else [*comparison["encoders"], RANDOM], "table": comparison["table"] + table,
            "records": comparison.get("records", []) + records}


def targets(comparison: dict, labels: dict[str, str]) -> list[str]:
    """The issue's two targets on the 1 % AUC (best pooling), for the probe and for kNN, with the
    seed-by-seed (paired) difference beside each: the seeds share label subsets across encoders."""
    from medssl.eval.compare import best_rows, paired_differences

    def paired(a: str, b: str, method: str) -> str:
        d = paired_differences(comparison, labels[a], labels[b], method, "auc").get(0.01)
        return "" if d is None else (f" (paired over seeds: {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} points, "
                                     f"ahead on {d['wins']} of {d['n']} seeds)")

    lines = []
    for method in ("probe", "knn"):
        best = best_rows(comparison["table"], method, "auc")  # {encoder: its best-pooling row at each fraction}
        auc = {k: next(r["auc"] for r in best[labels[k]] if r["fraction"] == 0.01) for k in labels}
        rival = max(("dino", "simclr", "barlow", "mae+dino"), key=lambda k: auc[k])
        gain = 100 * (auc[rival] - auc["mae"])
        part = max(("mae", "dino"), key=lambda k: auc[k])
        lines.append(f"- {method}, 1 % labels, AUC: best contrastive/combined = {labels[rival]} {auc[rival]:.3f} vs MAE "
                     f"{auc['mae']:.3f}: {gain:+.1f} points{paired(rival, 'mae', method)} (target +3: "
                     f"{'met' if gain >= 3 else 'missed'}); MAE+DINO {auc['mae+dino']:.3f} vs the better of MAE and DINO, "
                     f"{labels[part]} {auc[part]:.3f}{paired('mae+dino', part, method)} "
                     f"({'met' if auc['mae+dino'] >= auc[part] else 'missed'}).")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MedMNIST .npz with train and val splits")
    p.add_argument("--out", required=True, help="runs go to OUT/<objective>/{pretrain,evaluation}, the comparison to OUT/compare")
    p.add_argument("--minutes", type=float, default=4.0, help="pretraining budget per objective at the measured speed")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--batch-size", type=int, help="default: 64 in 2D, 16 in 3D")
    p.add_argument("--poolings", default="cls,mean")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a bundle setting for every objective whose bundle has it, e.g. --set koleo_weight=0.1")
    p.add_argument("--markdown", help="write the section into this file between <!-- objectives_<data> --> markers")
    p.add_argument("--image", help="copy the comparison plot here (a path under docs/images/)")
    p.add_argument("--block", help="name of the section's markers in --markdown (default objectives_<data>)")
    args = p.parse_args()

    from medssl.bundle_settings import config_settings
    from medssl.bundles import bundle_config, data_overrides
    from medssl.workflows import evaluate, parse_sets
    from medssl.eval.compare import best_table, compare_results, load_results, paired_table, write_comparison
    from medssl.eval.protocol import EvalPlan

    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    fit = data_overrides(data)
    if not fit:
        raise SystemExit(f"--data {data}: expected a MedMNIST .npz")
    dims, size, patch = fit["spatial_dims"], fit["image_size"], fit["patch_size"]
    batch = args.batch_size or (64 if dims == 2 else 16)
    n_train, name = train_size(data), data.name.split("_")[0]
    shown = name[0].upper() + name[1:].replace("mnist", "MNIST").replace("3d", "3D")  # adrenalmnist3d -> AdrenalMNIST3D
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    threads = torch.get_num_threads()

    speed_file = out / "speeds.json"  # measured once, so a resumed run keeps its budget
    speeds = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    for objective in objectives:
        if objective not in speeds:
            speeds[objective] = measure_speed(objective, dims, size, patch, batch)
            out.mkdir(parents=True, exist_ok=True)
            speed_file.write_text(json.dumps(speeds, indent=1) + "\n")
        print(f"{objective:9} {speeds[objective]:7.1f} samples/s", flush=True)

    common = {**fit, "batch_size": batch, "view_modality": "DX" if dims == 2 else "MR", "picture_every": 5}
    sets = parse_sets(args.set or [])
    known = {o: config_settings(bundle_config(OBJECTIVES[o][1]))[0] for o in objectives}
    unknown = [k for k in sets if not any(k.split("#")[0] in keys for keys in known.values())]
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: no bundle of these objectives has such a setting")
    runs, results = [], {}
    for i, objective in enumerate(objectives):
        label = OBJECTIVES[objective][0]
        epochs = max(1, round(args.minutes * 60 * speeds[objective] / n_train))
        home = out / objective.replace("+", "_")
        own = {k: v for k, v in sets.items() if k.split("#")[0] in known[objective]}  # e.g. koleo_weight: DINO's bundle only
        seconds = pretrain_once(objective, {**common, **own, "dataset_dir": str(data), "max_epochs": epochs}, home / "pretrain")
        plan = EvalPlan(methods=("probe", "knn"), baselines=("pixels", "random") if i == 0 else (), seeds=args.seeds,
                        poolings=tuple(args.poolings.split(",")))
        evaluate(home / "pretrain" / "models" / "model.pt", data, home / "evaluation", plan=plan, progress=False)
        results[label] = load_results(home / "evaluation")
        runs.append((label, OBJECTIVES[objective][1], speeds[objective], epochs, epochs * n_train / (args.minutes * 60 * speeds[objective]),
                     seconds))
        print(f"{label}: {epochs} epochs, pretrained in {seconds / 60:.1f} min, evaluated", flush=True)

    title = f"{shown}: objectives at an equal {args.minutes:g}-minute budget"
    comparison = compare_results(results)
    write_comparison(comparison, out / "compare", title=title, reference="MAE" if "mae" in objectives else None)
    labels = {o: OBJECTIVES[o][0] for o in objectives}
    text = [f"{data.name}: {n_train} training images (labels unused), {dims}D {size} px, patch {patch}, batch {batch}, "
            f"ViT-Tiny, global attention, {threads} threads. "
            f"Budget {args.minutes:g} min per objective at the measured speed; evaluation: probe and kNN, "
            f"poolings {args.poolings}, {args.seeds} seeds, on the val split.", "",
            "| objective | bundle | measured samples/s | epochs | share of budget | pretraining wall time (min) |",
            "|---|---|---:|---:|---:|---:|"]
    text += [f"| {lab} | `{b}` | {s:.1f} | {e} | {share:.2f} | {sec / 60:.1f} |" for lab, b, s, e, share, sec in runs]
    text += ["", "AUC (val), best pooling per fraction:", "", *best_table(comparison["table"], "auc"), ""]
    if "mae" in objectives and len(objectives) > 1:
        text += ["AUC minus MAE's, seed by seed on the same label subsets (mean ± std, seeds ahead / seeds):", "",
                 *paired_table(comparison, "auc", "MAE"), ""]
    with_random = random_as_encoder(comparison)
    if with_random is not None:
        text += ["AUC minus the randomly initialised encoder's (the same ViT, frozen, same probe / kNN and label subsets), "
                 "seed by seed:", "", *paired_table(with_random, "auc", RANDOM), ""]
    if set(labels) >= {"mae", "dino", "simclr", "barlow", "mae+dino"}:
        text += ["Targets:", "", *targets(comparison, labels)]
    if args.image:
        image = ROOT / args.image
        shutil.copyfile(out / "compare" / "comparison.png", image)
        link = os.path.relpath(image, Path(args.markdown).resolve().parent) if args.markdown else image
        text += ["", f"![{title}]({link})"]
    text = "\n".join(text)
    print("\n" + text)
    if args.markdown:
        command = (f"python bench/objectives.py --data {args.data} --out {args.out} --minutes {args.minutes:g}"
                   + (f" --objectives {args.objectives}" if args.objectives != ",".join(OBJECTIVES) else "")
                   + "".join(f" --set {shlex.quote(pair)}" for pair in args.set or [])
                   + (f" --image {args.image}" if args.image else "") + (f" --block {args.block}" if args.block else "")
                   + f" --markdown {args.markdown}")
        write_block(args.markdown, args.block or f"objectives_{name}", command, text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
