"""``medssl <command>``: a thin command line over the library.

Each command imports what it needs when it runs, so ``medssl --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError
from .workflows import evaluate, parse_sets, pretrain

__all__ = ["main"]


def _scan(args) -> int:
    from .data.scan import scan_folder, write_datalist

    out = Path(args.out)
    result = scan_folder(args.folder, salt=args.salt, modality=args.modality, progress=not args.quiet,
                         exclude=(str(out.absolute()),), patient_from=args.patient_from)
    path = write_datalist(result, out)
    print(result.summary())
    print(f"\nwrote {path} ({len(result.entries)} entries, {len(result.skipped)} skipped)")
    return 0 if result.entries else 1


def _preview(args) -> int:
    from .data.dataset import load_source
    from .viz.preview import write_previews

    entries = load_source(args.source)
    files = write_previews(entries, args.out, size_3d=args.size_3d, size_2d=args.size_2d, max_items=args.max_items,
                           progress=not args.quiet)
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _phantoms(args) -> int:
    from .data.synthetic import make_phantoms

    out = make_phantoms(args.out, n_cases=args.cases, seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.cases} phantom cases to {out} (ct_dicom/, ct_nifti/, xray/, labels.csv)")
    return 0


def _takes_many_sources(bundle: str) -> bool:
    """A multi-source bundle (medformer_multi): its ``dataset_dir`` is a list, one data set per source."""
    from .bundle_settings import load_config
    from .bundles import bundle_config

    return isinstance(load_config(bundle_config(bundle, "train")).get("dataset_dir"), list)


def _pretrain_overrides(args) -> dict:
    from .bundles import data_overrides
    from .workflows import check_dimensionality

    if args.data and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    if args.data and _takes_many_sources(args.bundle):
        raise UserError(f"{args.bundle} trains on several data sets, one per source: give them as "
                        f"--set \"dataset_dir=['first', 'second']\" (in the order of its sources), not --data")
    overrides = dict(data_overrides(args.data)) if args.data else {}
    if args.data:
        overrides["dataset_dir"] = str(Path(args.data).resolve())
    flags = {"max_epochs": args.max_epochs, "batch_size": args.batch_size, "num_workers": args.workers,
             "vit_size": args.size, "image_size": args.image_size, "patch_size": args.patch_size, "seed": args.seed}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    sets = parse_sets(args.set)
    if "spatial_dims" in overrides and "spatial_dims" not in sets:
        check_dimensionality(args.bundle, args.data, overrides["spatial_dims"])
    overrides.update(sets)
    return overrides


def _pretrain(args) -> int:
    out = pretrain(args.bundle, args.out, _pretrain_overrides(args), resume=args.resume, progress=not args.quiet,
                   overwrite=args.overwrite, private=args.private, tracking=args.tracking)
    print(f"\nencoder:     {out / 'models' / 'model.pt'}\ncheckpoints: {out / 'models'}\n"
          f"pictures:    {out / 'pictures'}\nlogs:        {out / 'logs'}  (tensorboard --logdir {out / 'logs'})")
    return 0


def _embed(args) -> int:
    from .bundles import data_overrides, run_bundle

    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    ckpt = Path(args.checkpoint).resolve()
    from .run_record import checkpoint_record

    bundle, overrides = checkpoint_record(ckpt, args.bundle, config="inference")
    from .bundle_settings import config_settings
    from .bundles import bundle_config

    known, _ = config_settings(bundle_config(bundle, "inference"))
    overrides.update({k: v for k, v in data_overrides(args.data).items() if k not in overrides and k in known})
    overrides.update(dataset_dir=str(Path(args.data).resolve()), ckpt_path=str(ckpt), embeddings_file=str(Path(args.out).resolve()),
                     pooling=args.pooling, output_dir=str(Path(args.out).resolve().parent), split=args.split,
                     embeddings_table=args.table, progress=not args.quiet, **parse_sets(args.set))
    run_bundle(bundle, "inference", overrides)
    table = "" if args.table == "none" else f" and {Path(args.out).with_suffix('.' + args.table)}"
    print(f"wrote {args.out}{table}")
    return 0


def _prepare(args) -> int:
    from .workflows import prepare

    if not Path(args.data).exists():
        raise FileNotFoundError(f"{args.data} does not exist")
    counts = prepare(args.bundle, args.data, args.cache, _pretrain_overrides(args), workers=args.workers if args.workers is not None else 2,
                     progress=not args.quiet)
    total = counts["written"] + counts["present"] + counts["unreadable"]
    print(f"{args.cache}: {counts['written']} item(s) written, {counts['present']} already there, {counts['unreadable']} unreadable "
          f"(of {total}, {counts['seconds']:.1f} s)\ntrain with: medssl pretrain --bundle {args.bundle} --data {args.data} "
          f"--set cache=disk --set cache_dir={Path(args.cache).resolve()} (and the same other settings)")
    return 0 if total and counts["unreadable"] < total else 1


def _plan(args):
    from .eval.protocol import EvalPlan

    split = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    return EvalPlan(fractions=tuple(float(v) for v in split(args.fractions)), seeds=args.seeds, methods=split(args.methods),
                    baselines=split(args.baselines), poolings=split(args.poolings), epochs=args.epochs,
                    finetune_pooling=args.finetune_pooling, optimizer=args.optimizer, dba_strategy=args.dba_strategy,
                    class_weight=args.class_weight)


def _evaluate(args) -> int:
    files = evaluate(args.checkpoint, args.data, args.out, args.bundle, _plan(args), progress=not args.quiet,
                     private=args.private, settings=parse_sets(args.set))
    print((Path(args.out) / "results.md").read_text())
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _benchmark(args) -> int:
    """Pretrain on the training images without their labels, then evaluate: does pretraining help here?"""
    out = Path(args.out).resolve()
    overrides = _pretrain_overrides(args)
    run = pretrain(args.bundle, out / "pretrain", overrides, resume=args.resume, progress=not args.quiet,
                   overwrite=args.overwrite)
    files = evaluate(run / "models" / "model.pt", args.data, out / "evaluation", args.bundle, _plan(args), progress=not args.quiet)
    print((out / "evaluation" / "results.md").read_text())
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _compare(args) -> int:
    """Several encoders' evaluations on the same data in one table and one plot."""
    from .eval.compare import compare_results, load_results, write_comparison

    results = {}
    for item in args.evaluations:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).resolve().parent.name, item
        if name in results:
            raise ValueError(f"two evaluations are named {name!r}: name them NAME=DIR")
        results[name] = load_results(path)
    poolings = tuple(v.strip() for v in args.poolings.split(",") if v.strip()) if args.poolings else None
    if args.reference and args.reference not in results:
        raise ValueError(f"--reference {args.reference!r} is not among the evaluations: {list(results)}")
    files = write_comparison(compare_results(results, poolings), args.out, title=args.title, reference=args.reference)
    print((Path(args.out) / "comparison.md").read_text())
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _attention(args) -> int:
    """Last-block attention maps of an encoder over the first images of a dataset."""
    from monai.data import DataLoader

    from .bundles import bundle_parser
    from .data.dataset import build_dataset, load_source
    from .data.pipeline import build_transforms
    from .eval.features import load_encoder
    from .viz.attention import write_attention_pictures

    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    ckpt = Path(args.checkpoint).resolve()
    from .run_record import checkpoint_record

    name, settings = checkpoint_record(ckpt, args.bundle)
    get = bundle_parser(name, settings).get_parsed_content
    dims, size = get("spatial_dims"), get("image_size")
    encoder = load_encoder(get("network_def", lazy=False), ckpt).eval()
    entries = load_source(args.data, spatial_dims=dims)[: args.max_images]
    if not entries:
        raise ValueError(f"no {dims}D images in {args.data}")
    transform = build_transforms(train=False, spatial_dims=dims, size=size, channels=get("in_channels"), ct_windows=get("ct_window"))
    loader = DataLoader(build_dataset(entries, transform, cache="none"), batch_size=1)
    images = [batch["image"][0].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"][0] for batch in loader]
    files = write_attention_pictures(encoder, images, args.out, size, title=f"{name}: last-block attention ({ckpt.name})")
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _fuse(args) -> int:
    """Fused scans of several patients (BrainFuse), as files a researcher can open."""
    from .workflows import fuse

    files = fuse(args.checkpoint, args.data, args.out, patients=args.patients, count=args.count, space=args.space,
                 smoothness=args.smoothness, regions=args.regions, seed=args.seed, bundle=args.bundle)
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _demo(args) -> int:
    """The README's main job on the embedded data: phantoms -> scan -> preview -> 3D MAE pretraining."""
    from .data.scan import scan_folder, write_datalist
    from .data.synthetic import make_phantoms
    from .viz.preview import write_previews

    out = Path(args.out).resolve()
    data = make_phantoms(out / "data", n_cases=args.cases, seed=args.seed, progress=not args.quiet)
    result = scan_folder(data, progress=not args.quiet)
    datalist = write_datalist(result, out / "datalist.json")
    print(result.summary())
    files = write_previews(result.entries, out / "preview", max_items=args.cases * 3, progress=not args.quiet)
    print("\npretraining a 3D MAE (ViT-Tiny, ViTDet windows) on the phantom CT series ...")
    run = pretrain("mae_ct_3d", out / "pretrain", {"dataset_dir": str(data / "ct_dicom"), "max_epochs": args.epochs,
                                                   "picture_every": max(1, args.epochs // 4), "seed": args.seed},
                   progress=not args.quiet, overwrite=True)  # the demo remakes its folder each time it runs
    pictures = sorted((run / "pictures").glob("*.png"))
    print(f"\nphantoms:    {data}\ndatalist:    {datalist}\npreviews:    " + "\n             ".join(str(f) for f in files))
    print(f"encoder:     {run / 'models' / 'model.pt'}\ncheckpoints: {run / 'models'}\nlogs:        {run / 'logs'}\n"
          "MAE pictures: " + "\n             ".join(str(f) for f in pictures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medssl", description="Self-supervised pretraining for medical imaging (MONAI).")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="find images under a folder and write a datalist JSON")
    p.add_argument("folder")
    p.add_argument("--out", default="datalist.json", help="datalist to write (default: datalist.json)")
    p.add_argument("--salt", default=None, help="salt for patient hashes (default: $MEDSSL_SALT or a per-user salt)")
    p.add_argument("--modality", default=None, help="modality for non-DICOM files, e.g. CT or MR (default: guessed)")
    p.add_argument("--patient-from", choices=("file", "folder"), default="file",
                   help="non-DICOM patient id: each file, or the first folder below FOLDER (default: file)")
    p.set_defaults(func=_scan)

    p = sub.add_parser("preview", help="write PNG grids of images after the transforms")
    p.add_argument("source", help="datalist .json, folder or MedMNIST .npz")
    p.add_argument("--out", default="preview")
    p.add_argument("--size-3d", type=int, default=64, help="3D patch edge (default 64)")
    p.add_argument("--size-2d", type=int, default=224, help="2D image edge (default 224)")
    p.add_argument("--max-items", type=int, default=24)
    p.set_defaults(func=_preview)

    p = sub.add_parser("phantoms", help="write the embedded synthetic CT / radiograph data set")
    p.add_argument("--out", default="phantoms")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_phantoms)

    p = sub.add_parser("pretrain", help="pretrain an encoder with a bundle (checkpoints, logs, pictures in --out)")
    p.add_argument("--bundle", required=True, help="bundle name (mae_ct_3d, mae_xray_2d, ...) or folder")
    p.add_argument("--data", help="folder of images, datalist .json or MedMNIST .npz (default: the embedded phantoms)")
    p.add_argument("--out", required=True, help="run folder: models/model.pt, checkpoints, logs/, pictures/, run.json")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (a larger "
                   "--max-epochs extends a finished run; the LR schedule is rebuilt for the new total)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run (deletes its "
                   "checkpoints, pictures, logs and run.json)")
    p.add_argument("--private", action="store_true", help="record the data folder in run.json as a hash, not its path")
    p.add_argument("--tracking", choices=("mlflow",), help="experiment tracking with MONAI's MLflow handlers "
                   "(pip install medssl[mlflow]); runs are stored in OUT/mlruns.db")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="data loader processes")
    p.add_argument("--size", choices=("micro", "tiny", "small", "base"), help="ViT size")
    p.add_argument("--image-size", type=int, help="image (2D) or patch (3D) edge")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other bundle setting, e.g. --set mask_ratio=0.6")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("prepare", help="fill a shared preprocessed cache (cache: disk) ahead of training")
    p.add_argument("data", help="folder of images, datalist .json or CSV")
    p.add_argument("--cache", required=True, help="the cache folder (share it between runs and ranks)")
    p.add_argument("--bundle", default="mae_ct_3d", help="the bundle whose transforms the cache holds (default mae_ct_3d)")
    p.add_argument("--workers", type=int, help="processes filling the cache (default 2)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="other settings of the training run (e.g. --set pixdim=1.5)")
    p.set_defaults(func=_prepare, max_epochs=None, batch_size=None, size=None, patch_size=None, seed=None)

    p = sub.add_parser("embed", help="write one embedding per image (every split) to an .npz and a .csv / .parquet table")
    p.add_argument("--checkpoint", required=True, help="encoder weights (RUN/models/model.pt)")
    p.add_argument("--data", required=True, help="folder of images, datalist .json, CSV or MedMNIST .npz")
    p.add_argument("--out", required=True, help="the .npz to write; the table goes beside it (same name, .csv / .parquet)")
    p.add_argument("--pooling", choices=("cls", "mean", "flatten"), default="mean")
    p.add_argument("--split", default="all", help="all (default: every split / entry list), or train, val, test")
    p.add_argument("--table", choices=("csv", "parquet", "none"), default="csv", help="the table's format (default csv)")
    p.add_argument("--bundle", help="bundle that trained the checkpoint (default: from RUN/run.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_embed)

    def plan_flags(p):
        p.add_argument("--fractions", default="0.01,0.1,1", help="label fractions (default 0.01,0.1,1)")
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--methods", default="probe,knn,finetune")
        p.add_argument("--baselines", default="scratch,resnet18,pixels,random", help="comma list (random: probe and kNN on a randomly initialised encoder); empty string for none")
        p.add_argument("--poolings", default="cls,mean,flatten")
        p.add_argument("--epochs", type=int, default=30, help="fine-tuning / from-scratch epochs (early stopping)")
        p.add_argument("--finetune-pooling", choices=("cls", "mean", "flatten"), default="cls",
                       help="pooling of the fine-tuned and from-scratch ViT's head (default cls)")
        from .optim.names import OPTIMIZERS, STRATEGIES

        p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", metavar="{adamw,sgd,adam,dba,edba,...}",
                       help="optimizer of fine-tuning and the trained baselines (default adamw); dba / edba adapt the batch "
                            "size per epoch (Dynamic Batch Adaptation; dba-sgd, edba-adam ... choose the inner optimizer)")
        p.add_argument("--dba-strategy", choices=STRATEGIES, default="variance_norm", help="DBA's stride selection (default variance_norm)")
        p.add_argument("--class-weight", choices=("balanced", "none"), default="balanced",
                       help="loss weights of fine-tuning and the trained baselines: balanced (inverse class frequency of the "
                            "labelled subset, so few labels of an imbalanced set do not teach the majority class alone) or none")

    p = sub.add_parser("evaluate", help="linear probe, kNN and fine-tuning at several label fractions, with baselines")
    p.add_argument("--checkpoint", required=True, help="encoder weights (RUN/models/model.pt)")
    p.add_argument("--data", required=True, help="MedMNIST .npz, CSV with image,label[,split][,modality], or datalist .json with labels")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, results.png")
    p.add_argument("--bundle", help="bundle that trained the checkpoint (default: from RUN/run.json)")
    p.add_argument("--private", action="store_true", help="record data and checkpoint paths in the reports as hashes")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting of the bundle's evaluate config over the run's record (a Medformer: spatial_dims=3, "
                        "image_size=28, organ=abdomen, modality=CT of the data set evaluated)")
    plan_flags(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("benchmark", help="pretrain on the images without labels, then evaluate against baselines")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="MedMNIST .npz, CSV with image,label[,split][,modality], or datalist .json with labels")
    p.add_argument("--out", required=True, help="pretrain/ and evaluation/ go here")
    p.add_argument("--resume", action="store_true", help="continue a stopped benchmark in --out (the evaluation "
                   "always skips the runs it has finished)")
    p.add_argument("--overwrite", action="store_true", help="start the pretraining over in an --out that holds one")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--size", choices=("micro", "tiny", "small", "base"))
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    plan_flags(p)
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("compare", help="several encoders' evaluations of the same data side by side (table and plot)")
    p.add_argument("evaluations", nargs="+", metavar="[NAME=]DIR",
                   help="evaluation folders (or results.json) of medssl evaluate; NAME defaults to the folder's parent")
    p.add_argument("--out", required=True, help="folder for comparison.json, comparison.md, comparison.png")
    p.add_argument("--title", default="")
    p.add_argument("--poolings", help="compare only these poolings of the encoders, e.g. cls,mean (default: all)")
    p.add_argument("--reference", metavar="NAME", help="encoder the others are compared with seed by seed (default: the first)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("attention", help="attention maps of a pretrained encoder overlaid on images (PNG)")
    p.add_argument("--checkpoint", required=True, help="encoder weights (RUN/models/model.pt)")
    p.add_argument("--data", required=True, help="folder of images, datalist .json or MedMNIST .npz")
    p.add_argument("--out", required=True, help="folder for attention_NNN.png")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--bundle", help="bundle that trained the checkpoint (default: from RUN/run.json)")
    p.set_defaults(func=_attention)

    p = sub.add_parser("fuse", help="fuse several patients into new scans as a BrainFuse run does (NIfTI in 3D, PNG in 2D)")
    p.add_argument("--checkpoint", required=True, help="RUN/models/model.pt (the run's latest full checkpoint gives the generator)")
    p.add_argument("--data", required=True, help="folder of images, datalist .json or MedMNIST .npz")
    p.add_argument("--out", required=True, help="folder for fused_NNN_{raw,latent,partition}, fusion.json, fusion.png")
    p.add_argument("--patients", type=int, default=2, help="patients per fused scan, 2..8")
    p.add_argument("--count", type=int, default=4, help="fused scans to write")
    p.add_argument("--space", default="both", choices=["raw", "latent", "both"])
    p.add_argument("--smoothness", type=float, help="border width as a fraction of the image edge (default: the run's)")
    p.add_argument("--regions", type=int, help="regions of the partition (default 2 x patients)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", help="bundle that trained the checkpoint (default: from RUN/run.json)")
    p.set_defaults(func=_fuse)

    p = sub.add_parser("demo", help="main job on the embedded data: phantoms, scan, preview, 3D MAE pretraining")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--epochs", type=int, default=120, help="pretraining epochs (default 120: a few minutes on a laptop CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import describe, is_user_error

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"medssl {args.command}: interrupted" + (" (medssl pretrain --resume continues it)" if args.command == "pretrain"
                                                       else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"medssl {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2 if is_user_error(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
