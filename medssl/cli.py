"""``medssl <command>``: a thin command line over the library.

Each command imports what it needs when it runs, so ``medssl --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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


def _demo(args) -> int:
    """The README's main job on the embedded data: phantoms -> scan -> preview."""
    from .data.scan import scan_folder, write_datalist
    from .data.synthetic import make_phantoms
    from .viz.preview import write_previews

    out = Path(args.out)
    data = make_phantoms(out / "data", n_cases=args.cases, seed=args.seed, progress=not args.quiet)
    result = scan_folder(data, progress=not args.quiet)
    datalist = write_datalist(result, out / "datalist.json")
    print(result.summary())
    files = write_previews(result.entries, out / "preview", max_items=args.cases * 3, progress=not args.quiet)
    print(f"\nphantoms:  {data}\ndatalist:  {datalist}\npreviews:  " + "\n           ".join(str(f) for f in files))
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

    p = sub.add_parser("demo", help="main job on the embedded data: phantoms, scan, preview")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"medssl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
