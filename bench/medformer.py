"""The Medformer pretrained on two data sets at once against a ViT MAE pretrained on each alone (issue #19).

One Medformer (``medformer_multi``, MAE on every source) pretrains on PneumoniaMNIST (2D chest
X-ray) and AdrenalMNIST3D (3D abdominal CT) together, each batch from one source (``proportional``:
each source's batches once per epoch), for the sum of the single-data-set runs' wall-time budgets
at the measured speed. The ablation is the same model with shared latents only (``collections: {}``,
as many latents in all). Each encoder is then evaluated on each data set (probe and kNN at 1 / 10 /
100 % of the labels, 3 seeds, the val split) and compared, seed by seed on the same label subsets,
with the single-data-set ViT-Tiny MAE evaluations given by ``--single`` (``bench/objectives.py``
runs). Parameter counts and training speeds are reported beside the ViT's.

Resumable: finished pretraining runs and evaluations under ``--out`` are kept.

    python bench/medformer.py --out runs/medformer --minutes 8 \\
        --single pneumoniamnist=runs/obj21_pneumonia/mae --single adrenalmnist3d=runs/obj15_adrenal/mae \\
        --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import train_size  # noqa: E402
from report import write_block  # noqa: E402
from task_throughput import samples_per_second, stepper  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
SOURCES = [  # name, file, dims, organ, modality, batch
    ("pneumoniamnist", "pneumoniamnist_28_trainval.npz", 2, "chest", "DX", 64),
    ("adrenalmnist3d", "adrenalmnist3d_28_trainval.npz", 3, "abdomen", "CT", 16),
]
# name: (label, collections (None: the bundle's organ / modality / dims / task), model settings over MODEL)
VARIANTS = {"joint": ("Medformer, joint", None, {}), "shared": ("Medformer, joint, shared latents only", {}, {}),
            "joint_small": ("Medformer, joint, half the latents", None, {"num_latents": 16, "latents_per_entry": 2})}
MODEL = dict(patch_size=4, embed_dim=192, num_heads=3, depth=6, num_latents=32, latents_per_entry=4)


def _settings(variant: str) -> dict:
    """The variant's model settings; the ablation (no collections) gets the collections' 4 x per-entry latents as shared
    ones, as many in all."""
    _, collections, extra = VARIANTS[variant]
    model = {**MODEL, **extra}
    if collections is not None:
        model["num_latents"] += 4 * model["latents_per_entry"]
    return model


def _model(variant: str, **kwargs):
    from medssl.models import Medformer

    return Medformer(**_settings(variant), collections=VARIANTS[variant][1], **kwargs)


def _speed_key(variant: str, source: str) -> str:
    """speeds.json's key: the source's name for the default model (as first recorded), else variant:source."""
    return source if not VARIANTS[variant][2] else f"{variant}:{source}"


def measure_speed(variant: str, dims: int, batch: int, rounds: int = 3) -> float:
    """MAE training samples/s of the Medformer on 28-px images of ``dims`` dimensions, stepped as the ViT's speed was
    (``task_throughput.stepper``: the training's autocast, bf16 where the CPU has it)."""
    from medssl.engine import MultiTask
    from medssl.tasks import MAETask

    torch.manual_seed(0)
    task = MAETask(_model(variant).view(dims), mask_ratio=0.75, norm_pix_loss=True)
    step = stepper(MultiTask([task]), [{"image": torch.rand(batch, 1, *[28] * dims)}])
    return samples_per_second(step, batch, rounds)


def pretrain_variant(name: str, epochs: int, out: Path) -> float:
    from medssl.atomic import atomic_write
    from medssl.engine.checkpoint import latest_checkpoint
    from medssl.workflows import pretrain

    if (out / "done.json").exists():
        return json.loads((out / "done.json").read_text())["seconds"]
    collections = VARIANTS[name][1]
    sources = [{"name": n, "data": f"@dataset_dir#{i}", "spatial_dims": d, "image_size": 28, "organ": organ, "modality": modality,
                "batch_size": batch} for i, (n, _, d, organ, modality, batch) in enumerate(SOURCES)]
    overrides = {"dataset_dir": [str(DATA / f) for _, f, *_ in SOURCES], "sources": sources, "task_names": ["mae"],
                 "source_rule": "proportional", "max_epochs": epochs, "picture_every": max(1, epochs // 2),
                 **_settings(name), "collections": collections}
    start = time.perf_counter()
    pretrain("medformer_multi", out, overrides, resume=latest_checkpoint(out / "models") is not None, progress=False)
    seconds = time.perf_counter() - start
    with atomic_write(out / "done.json", "w") as f:
        f.write(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def evaluate_variant(name: str, ckpt: Path, source: tuple, out: Path, seeds: int) -> None:
    from medssl.eval.protocol import EvalPlan, evaluate_checkpoint

    _, file, dims, organ, modality, _ = source
    if (out / "results.json").exists():  # finished (possibly under an older plan's defaults): kept as it is
        return

    def build():
        return _model(name, spatial_dims=dims,
                      default_context={"organ": organ, "modality": modality} if VARIANTS[name][1] is None else None)

    # the joint run's evaluation also scores the same Medformer randomly initialised (what pretraining must beat)
    plan = EvalPlan(methods=("probe", "knn"), baselines=("random",) if name == "joint" else (), poolings=("cls", "mean"), seeds=seeds)
    evaluate_checkpoint(build, ckpt, DATA / file, out, spatial_dims=dims, size=28, plan=plan, progress=False,
                        title=f"{VARIANTS[name][0]} on {file}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=8.0, help="pretraining budget of each Medformer (the singles' sum)")
    p.add_argument("--single", action="append", default=[], metavar="NAME=RUN",
                   help="a single-data-set ViT run (RUN/pretrain, RUN/evaluation) per source name")
    p.add_argument("--variants", default="joint,shared")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--markdown")
    args = p.parse_args()

    from medssl.eval.compare import best_table, compare_results, load_results, paired_table

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    singles = dict(s.split("=", 1) for s in args.single)
    speed_file = out / "speeds.json"
    speeds = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    variants = args.variants.split(",")
    for variant in variants:
        for name, _, dims, *_, batch in SOURCES:
            if _speed_key(variant, name) not in speeds:
                speeds[_speed_key(variant, name)] = measure_speed(variant, dims, batch)
                speed_file.write_text(json.dumps(speeds, indent=1) + "\n")
    sizes = {name: train_size(DATA / f) for name, f, *_ in SOURCES}
    epochs = {v: max(1, round(args.minutes * 60 / sum(sizes[n] / speeds[_speed_key(v, n)] for n in sizes))) for v in variants}
    print(f"speeds {speeds}; epochs in the {args.minutes:g}-minute budget {epochs}", flush=True)
    rows = []
    for variant in variants:
        seconds = pretrain_variant(variant, epochs[variant], out / variant / "pretrain")
        rows.append((variant, seconds))
        for source in SOURCES:
            evaluate_variant(variant, out / variant / "pretrain" / "models" / "model.pt", source, out / variant / f"evaluation_{source[0]}",
                             args.seeds)
        print(f"{variant}: pretrained in {seconds / 60:.1f} min, evaluated", flush=True)

    params = {v: sum(p.numel() for p in _model(v).parameters()) for v in variants}
    from medssl.models import ViT

    params_vit = sum(p.numel() for p in ViT(2, 1, patch_size=4, size="tiny").parameters())
    single_speeds = {}
    for name, run in singles.items():
        f = Path(run).parent / "speeds.json"
        if f.exists():
            single_speeds[name] = json.loads(f.read_text()).get("mae")
    text = [f"Medformer (Perceiver IO, {MODEL['embed_dim']} wide, {MODEL['depth']} latent blocks, patch 4; latents per row below); "
            f"ViT-Tiny (patch 4): {params_vit / 1e6:.2f} M parameters. MAE on every source, each batch from one source "
            f"(proportional), as many epochs of both sets as the {args.minutes:g}-minute budget (the two single runs' sum) "
            f"gives at each variant's measured speed. Threads: {torch.get_num_threads()}.", "",
            "| encoder | latents (shared + per organ / modality / dims / task entry) | parameters | pretraining data | epochs | "
            "samples/s (MAE training, 2D / 3D) | pretraining wall time (min) |", "|---|---|---:|---|---:|---:|---:|"]
    for v, sec in rows:
        m = _settings(v)
        latents = f"{m['num_latents']} shared" if VARIANTS[v][1] == {} else f"{m['num_latents']} + {m['latents_per_entry']} per entry"
        text.append(f"| {VARIANTS[v][0]} | {latents} | {params[v] / 1e6:.2f} M | both | {epochs[v]} | "
                    f"{speeds[_speed_key(v, 'pneumoniamnist')]:.0f} / {speeds[_speed_key(v, 'adrenalmnist3d')]:.1f} | {sec / 60:.1f} |")
    text += [f"| ViT-Tiny MAE | - | {params_vit / 1e6:.2f} M | {name} alone | (its run) | {single_speeds.get(name, float('nan')):.1f} | "
             "(its run) |" for name in singles]
    for name, *_ in SOURCES:
        results = {}
        if name in singles:
            results["ViT MAE, this set alone"] = load_results(Path(singles[name]) / "evaluation")
        for variant in args.variants.split(","):
            results[VARIANTS[variant][0]] = load_results(out / variant / f"evaluation_{name}")
        comparison = compare_results(results)
        text += ["", f"**{name}** (val split): AUC, best pooling per fraction", "", *best_table(comparison["table"], "auc")]
        if "ViT MAE, this set alone" in results:
            text += ["", "AUC minus the single-data-set ViT MAE's, seed by seed (mean ± std, seeds ahead / seeds):", "",
                     *paired_table(comparison, "auc", "ViT MAE, this set alone")]
    text = "\n".join(text)
    print("\n" + text)
    if args.markdown:
        command = "python bench/medformer.py " + " ".join(sys.argv[1:])
        write_block(args.markdown, "medformer_joint", command, text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
