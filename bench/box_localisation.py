"""How well a query-box pretraining run localises its crops on images it never trained on (issue #15).

Given a pretraining run folder (``medssl pretrain`` / ``bench/objectives.py`` with the box task)
and its MedMNIST ``.npz``, the run's full checkpoint (encoder + box decoder) scores the **val**
split (pretraining only sees the train split): the box views are made exactly as in training
(same settings, a fixed seed), the predictions are matched to the true boxes as in training, and
the script prints the mean IoU of the matched predictions and the share above 0.5. Beside it,
the best constant-box predictor: the mean box of the training images' boxes (centre and size),
given as the answer for every query, scored on the same val boxes. The target (issue #15): mean
IoU >= 0.5 in 2D, >= 0.4 in 3D, and at least twice the constant predictor's.

    python bench/box_localisation.py --run runs/obj15_pneumonia/box/pretrain \\
        --data ../shared/data/medmnist/pneumoniamnist_28_trainval.npz

Without ``--run``, only the constant-box figures, for the box views ``mae_dino_ct_3d`` would make
of this data with its defaults: how hard the task is before anything is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _views_of(parser, task_index: int):
    views = parser.get_parsed_content("views", lazy=False)
    return views[task_index]


def _items(dataset, views, seed: int, limit: int | None = None) -> list[dict]:
    from medssl.engine.determinism import derive_seed

    out = []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        views.set_random_state(seed=derive_seed(seed, i))
        item = dataset[i]
        for sample in item if isinstance(item, list) else [item]:
            out.append(views(sample))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="pretraining run folder (holds run.json and models/); without: the constant box only")
    p.add_argument("--data", required=True, help="the MedMNIST .npz it pretrained on (its val split is scored)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-sample", type=int, default=2000, help="training images whose boxes give the mean box")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", help="also draw the first 4 val images' boxes (true red, predicted blue) into this PNG")
    args = p.parse_args()
    if args.picture and not args.run:
        p.error("--picture draws a run's predictions: give --run")

    from medssl.bundles import bundle_parser
    from medssl.data.dataset import build_dataset, load_source
    from medssl.data.fields import collate_fields
    from medssl.engine.checkpoint import latest_checkpoint, load_checkpoint
    from medssl.run_record import read_run_record
    from medssl.tasks.box_matching import centre_size_to_corners, corners_to_centre_size
    from monai.data.box_utils import box_iou

    if args.run:
        run = Path(args.run).resolve()
        bundle, overrides = read_run_record(run / "run.json")
    else:
        from medssl.bundles import data_overrides

        run, bundle, overrides = None, "mae_dino_ct_3d", {**data_overrides(args.data), "task_names": ["box"]}
    parser = bundle_parser(bundle, {**overrides, "device": "$torch.device('cpu')", "cache": "none"})
    multitask = parser.get_parsed_content("multitask", lazy=False)
    names = list(multitask.names)
    if "box" not in names:
        raise SystemExit(f"{run} did not train the box task (tasks: {names})")
    views = _views_of(parser, names.index("box"))
    preprocessing = parser.get_parsed_content("train#preprocessing", lazy=False)
    dims = parser.get_parsed_content("spatial_dims")

    val = build_dataset(load_source(args.data, spatial_dims=dims, split="val"), preprocessing)
    val_items = _items(val, views, args.seed + 1)
    result = {"run": str(run) if run else None, "val_images": len(val)}
    if run:
        ckpt = latest_checkpoint(run / "models")
        multitask.load_state_dict(load_checkpoint(ckpt, map_location="cpu")["network"])
        task = multitask.tasks["box"].eval()
        ious = []
        with torch.no_grad():
            for i in range(0, len(val_items), args.batch_size):
                batch = collate_fields(val_items[i:i + args.batch_size])
                ious.append(task.localise(batch)["iou"])
        iou = torch.cat(ious)
        result.update(checkpoint=ckpt.name, val_boxes=len(iou), mean_iou=float(iou.mean()),
                      iou_above_half=float((iou > 0.5).float().mean()))
    if args.picture:
        from medssl.viz.panels import write_panels

        with torch.no_grad():
            write_panels(task.visualize(collate_fields(val_items[:4])), args.picture,
                         title="box task, held-out val images")

    train = build_dataset(load_source(args.data, spatial_dims=dims, split="train"), preprocessing)
    train_items = _items(train, views, args.seed, args.train_sample)
    size = torch.tensor(train_items[0]["image"].shape[1:], dtype=torch.float32).repeat(2)
    mean_box = corners_to_centre_size(torch.cat([it["query_boxes"] / size for it in train_items])).mean(0)
    constant = centre_size_to_corners(mean_box)[None] * size
    val_boxes = torch.cat([it["query_boxes"] for it in val_items])
    constant_iou = box_iou(constant, val_boxes)[0]

    target = 0.5 if dims == 2 else 0.4
    result.update(constant_mean_iou=float(constant_iou.mean()), constant_iou_above_half=float((constant_iou > 0.5).float().mean()),
                  mean_box_edges=[round(float(e), 2) for e in (val_boxes[:, dims:] - val_boxes[:, :dims]).mean(0)],
                  target_iou=target)
    if run:
        result["met"] = result["mean_iou"] >= target and result["mean_iou"] >= 2 * result["constant_mean_iou"]
        (run / "box_localisation.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
