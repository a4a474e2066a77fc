"""Regenerate the pictures the README, docs/ and the bundle READMEs show, from medssl's embedded phantoms.

    python docs/make_pictures.py            # about 5 minutes on 2 CPU cores; writes docs/images/*.png

Every picture is what a user's own run draws (the same commands, on the phantom CT series and
radiographs that `medssl phantoms` writes): preview grids of what a model sees, MAE input /
masked / reconstruction panels (3D and 2D), DINO and SimCLR views, last-block attention maps, query
boxes, I-JEPA's context and target blocks and BrainFuse fusions (patients, partition, raw and latent fusion).
Runs are short, so the reconstructions are blurry: they show what the pictures look like, not
how good a long run gets.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
ROOT = Path(__file__).resolve().parent.parent
# bundle -> (phantom folder, settings for a short run, pictures to keep as docs/images/<name>)
RUNS = {
    "mae_ct_3d": ("ct_dicom", {"max_epochs": 120, "picture_every": 120}, {"mae_final.png": "mae_ct_3d.png"}),
    "mae_xray_2d": ("xray", {"max_epochs": 150, "picture_every": 150, "image_size": 128}, {"mae_final.png": "mae_xray_2d.png"}),
    "dino_xray_2d": ("xray", {"max_epochs": 20, "picture_every": 20, "image_size": 128, "out_dim": 256},
                     {"dino_final.png": "dino_xray_2d.png"}),
    "simclr_xray_2d": ("xray", {"max_epochs": 20, "picture_every": 20, "image_size": 128}, {"simclr_final.png": "simclr_xray_2d.png"}),
    # the cyclic mix with the jigsaw task of docs/adding-a-task.md (key: a run name; "bundle" names the bundle)
    "mae_dino_jigsaw_ct_3d": ("ct_dicom", {"bundle": "mae_dino_ct_3d", "max_epochs": 30, "picture_every": 30, "out_dim": 256,
                                           "task_names": "['mae','dino','jigsaw']"}, {"jigsaw_final.png": "jigsaw_pictures.png"}),
    "ijepa_xray_2d": ("xray", {"bundle": "mae_xray_2d", "max_epochs": 40, "picture_every": 40, "image_size": 128, "method": "ijepa"},
                      {"ijepa_final.png": "ijepa_xray_2d.png"}),
    "box_xray_2d": ("xray", {"max_epochs": 60, "picture_every": 60, "image_size": 128},
                    {"box_final.png": ["box_xray_2d.png", ROOT / "bundles/box_xray_2d/docs/pictures.png"]}),
    "brainfuse_xray_2d": ("xray", {"max_epochs": 150, "picture_every": 150, "image_size": 128, "fuse_patients": 3},
                          {"brainfuse_final.png": ["brainfuse_xray_2d.png", ROOT / "bundles/brainfuse_xray_2d/docs/pictures.png"]}),
    # several sources at once: the embedded radiographs and CT series (no --data: one data set per source)
    "medformer_multi": (None, {"max_epochs": 40, "picture_every": 40},
                        {"mae_ct_final.png": ["medformer_ct.png", ROOT / "bundles/medformer_multi/docs/pictures.png"],
                         "mae_xray_final.png": "medformer_xray.png"}),
    "brainfuse_3d": ("ct_dicom", {"max_epochs": 60, "picture_every": 60, "image_size": 32, "patch_size": 4, "window_size": 0},
                     {"brainfuse_final.png": ["brainfuse_3d.png", ROOT / "bundles/brainfuse_3d/docs/pictures.png"]}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--only", help="comma list of bundles to rerun (default: all)")
    args = p.parse_args()

    from medssl.cli import main as medssl

    work = Path(args.work or tempfile.mkdtemp(prefix="medssl_pictures_"))
    IMAGES.mkdir(exist_ok=True)
    data = work / "phantoms"
    if not data.exists():
        assert medssl(["-q", "phantoms", "--out", str(data), "--cases", "8"]) == 0
    if not args.only:
        assert medssl(["-q", "preview", str(data), "--out", str(work / "preview"), "--max-items", "6"]) == 0
        for page in sorted((work / "preview").glob("preview_*_000.png")):
            shutil.copyfile(page, IMAGES / page.name.replace("_000", ""))  # preview_2d.png, preview_3d.png
    for bundle, (folder, settings, keep) in RUNS.items():
        if args.only and bundle not in args.only.split(","):
            continue
        out = work / bundle
        sets = [f for k, v in settings.items() if k not in ("max_epochs", "bundle") for f in ("--set", f"{k}={v}")]
        given = ["--data", str(data / folder)] if folder else []
        assert medssl(["-q", "pretrain", "--bundle", settings.get("bundle", bundle), *given, "--out", str(out), "--overwrite",
                       "--max-epochs", str(settings["max_epochs"]), *sets]) == 0
        for src, destinations in keep.items():  # a name in docs/images, or a path (a bundle's docs/pictures.png)
            for dst in destinations if isinstance(destinations, list) else [destinations]:
                shutil.copyfile(out / "pictures" / src, IMAGES / dst)
        if bundle == "dino_xray_2d":
            assert medssl(["-q", "attention", "--checkpoint", str(out / "models" / "model.pt"), "--data", str(data / folder),
                           "--out", str(work / "attention"), "--max-images", "4"]) == 0
            shutil.copyfile(work / "attention" / "attention_000.png", IMAGES / "attention_dino_xray_2d.png")
    print("\n".join(f"wrote {p}" for p in sorted(IMAGES.glob("*.png"))))


if __name__ == "__main__":
    main()
