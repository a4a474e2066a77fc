"""Size binning on a mixed-size radiograph set: padding, border, discarded images, MAE training speed.

The set: the real radiographs and fundus photographs of ``../shared/data`` (``xray/``, ``fundus/``)
plus generated radiographs in the standard detector / cassette formats (ISO 4090: 18x24, 24x30,
35x35, 35x43 and 43x43 cm, and stitched 35x91 cm long-leg / full-spine films) at one of three
detector pixel pitches (0.100, 0.143, 0.160 mm), portrait and landscape, mixed as a general
radiology archive might be (mostly chest on 35x43 / 43x43, extremities on the small formats; the
weights in ``FORMATS`` are our assumption, not a published census); 30 % are exported crops with
sizes of their own (80-100 % of the format per side), the rest have their format's exact size. Each generated
radiograph is a real chest film cropped to its format's aspect, with black collimation borders of
0-12 % per side. Files are written at a quarter of their native size (600-1600 px instead of
2400-6400): every strategy resizes images to the same ``--size`` budget, so the token arithmetic
depends on the aspects alone, and the smaller files keep the set's loading time reasonable.

For pad-to-square (the default pipeline), strict binning and smart binning, over one epoch:
the share of tokens that are padding (outside the image), the share that is background (patches
with no pixel above MAE's ``background_threshold``: padding plus black borders, what MAE drops
before the encoder), images discarded, MAE training samples/s and image tokens/s (tokens
inside images, per second) with the tiny ViT, and the samples/s of a whole-image encoder step
(every token forward and backward: what box queries, latent fusion and embeddings pay).

    python bench/binning.py                               # print the table
    python bench/binning.py --markdown docs/benchmarks.md # and record it there
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import publish

# (name, width cm, height cm, share of the archive); portrait unless the name says landscape
FORMATS = [("35x43 chest", 35, 43, 0.36), ("43x35 landscape", 43, 35, 0.10), ("43x43", 43, 43, 0.12), ("24x30 extremity", 24, 30, 0.16),
           ("30x24 landscape", 30, 24, 0.06), ("18x24 hand", 18, 24, 0.10), ("35x35", 35, 35, 0.04), ("35x91 long leg", 35, 91, 0.06)]
PIXEL_MM = (0.100, 0.143, 0.160)  # detector pixel pitches (mm)
CROPPED = 0.3  # share of images exported cropped (any size); the rest have their format's exact size


def _shared() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_set(folder: Path, n: int, seed: int = 0, scale: float = 0.25) -> Path:
    """Write ``n`` generated radiographs (plus copies of the real ones) into ``folder``; return it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shared = _shared()
    real = sorted((shared / "xray").glob("*.png")) + sorted((shared / "xray").glob("*.jpg"))
    if not real:
        sys.exit(f"{shared / 'xray'} not found: this benchmark needs the shared real radiographs")
    sources = [np.asarray(Image.open(p).convert("L")) for p in real]
    folder.mkdir(parents=True, exist_ok=True)
    shares = np.array([f[3] for f in FORMATS])
    for i, k in enumerate(rng.choice(len(FORMATS), n, p=shares / shares.sum())):
        _, w_cm, h_cm, _ = FORMATS[k]
        pitch = PIXEL_MM[int(rng.integers(len(PIXEL_MM)))]  # one of a few detector models
        crop = rng.uniform(0.8, 1.0, 2) if rng.random() < CROPPED else (1.0, 1.0)  # exported crops: sizes of their own
        w, h = (int(round(c * 10 / pitch * scale * f)) for c, f in zip((w_cm, h_cm), crop))
        src = sources[i % len(sources)]
        sh, sw = src.shape  # crop the source to the format's aspect, then resize
        if sw / sh > w / h:
            cw = int(sh * w / h)
            x0 = int(rng.integers(0, sw - cw + 1))
            crop = src[:, x0:x0 + cw]
        else:
            ch = int(sw * h / w)
            y0 = int(rng.integers(0, sh - ch + 1))
            crop = src[y0:y0 + ch]
        img = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
        img = img.copy()
        t, b, l, r = (int(rng.uniform(0, 0.12) * s) for s in (h, h, w, w))  # collimation: black borders
        img[:t], img[h - b:], img[:, :l], img[:, w - r:] = 0, 0, 0, 0
        Image.fromarray(img).save(folder / f"gen_{i:05d}.png")
    for p in real + sorted((shared / "fundus").rglob("*.jpg")) + sorted((shared / "fundus").rglob("*.png")):
        if "1stHO" in p.name or "2ndHO" in p.name:  # CHASE_DB1's vessel masks are not photographs
            continue
        (folder / f"real_{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    return folder


def measure(entries, mode: str, size: int, patch: int, batch_size: int, n_bins: int, steps: int, threshold: float = 0.02) -> dict:
    from medssl.data.binning import fit_shape, plan_bins
    from medssl.data.dataset import build_dataset
    from medssl.engine import MultiTask, PretrainTrainer, pretrain_loader
    from medssl.data.pipeline import build_transforms
    from medssl.models import ViT
    from medssl.engine.trainer import autocast_dtype
    from medssl.tasks import MAETask

    plan = plan_bins(entries, mode, n_bins=n_bins, size=size, multiple=patch, batch_size=batch_size, log=False)
    transform = build_transforms(spatial_dims=2, size=size, channels=1, binning=mode)
    ds = build_dataset(plan.entries, transform, cache="memory", progress=False, num_workers=2)
    loader = pretrain_loader(ds, batch_size=batch_size, seed=0, bins=plan.keys)
    tokens = padding = background = images = 0
    for batch in loader:  # one epoch: token accounting
        x = batch["image"]
        grid = [s // patch for s in x.shape[2:]]
        patches = x.reshape(x.shape[0], -1, grid[0], patch, grid[1], patch).amax(dim=(1, 3, 5))
        tokens += patches.numel()
        background += int((patches <= threshold).sum())
        images += x.shape[0]
    for e in plan.entries:  # padding: the bin (or square) area the resized image does not cover
        bin_shape = e.get("bin_shape") or (size, size)
        fitted = fit_shape(e["shape"], bin_shape) if mode != "none" else fit_shape(e["shape"], (size, size))
        padding += (1 - np.prod(fitted) / np.prod(bin_shape)) * np.prod(bin_shape) / patch ** 2
    torch.manual_seed(0)
    vit = ViT(2, 1, patch_size=patch, size="tiny", window_size=0)
    net = MultiTask([MAETask(vit, background_threshold=threshold)])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    trainer = PretrainTrainer("cpu", 1, loader, net, opt, seed=0, amp="auto", quiet=True, epoch_length=min(steps + 2, len(loader)))
    done = {"n": 0, "images": 0, "tokens": 0, "t0": None}

    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED)
    def _count(engine):
        done["n"] += 1
        if done["n"] == 2:  # two warm-up steps
            done["t0"] = time.perf_counter()
        elif done["n"] > 2:
            x = engine.state.batch["image"]
            done["images"] += x.shape[0]
            done["tokens"] += x.shape[0] * int(np.prod([s // patch for s in x.shape[2:]]))

    trainer.run()
    seconds = time.perf_counter() - done["t0"]
    image_tokens = done["tokens"] * (1 - padding / tokens)
    # what a task that encodes the whole image pays (box queries, latent fusion, embeddings): every token, forward + backward
    batches = []
    while len(batches) < steps + 2:  # as many epochs as the steps need
        batches += [b["image"] for _, b in zip(range(steps + 2 - len(batches)), loader)]
    full = ViT(2, 1, patch_size=patch, size="tiny", window_size=0)
    opt = torch.optim.AdamW(full.parameters(), lr=1e-4)
    dtype = autocast_dtype("cpu", "auto")
    for i, x in enumerate(batches):
        if i == 2:
            t0, n_full = time.perf_counter(), 0
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = full(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            n_full += x.shape[0]
    full_s = n_full / (time.perf_counter() - t0)
    return {"mode": mode, "bins": len(plan.bin_shapes) if mode != "none" else 1, "images": images, "dropped": plan.n_dropped,
            "tokens": tokens, "padding": padding / tokens, "background": background / tokens,
            "samples_s": done["images"] / seconds, "image_tokens_s": image_tokens / seconds, "full_s": full_s,
            "mean_batch": done["images"] / max(1, done["n"] - 2),
            "bin_report": plan.report()}


def draw_bins(entries, size: int, patch: int, n_bins: int, batch_size: int, out: str, per_bin: int = 4) -> None:
    """``out``: for pad-to-square and for each smart bin, ``per_bin`` images as the model gets them (padding in blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.data.binning import plan_bins
    from medssl.data.pipeline import build_transforms
    from medssl.viz.figure import save_figure

    plan = plan_bins(entries, "smart", n_bins=n_bins, size=size, multiple=patch, batch_size=batch_size, log=False)
    rows = [("pad to square", build_transforms(spatial_dims=2, size=size, channels=1), entries[:per_bin], (size, size))]
    binned = build_transforms(spatial_dims=2, size=size, channels=1, binning="smart")
    for shape in sorted(plan.bin_shapes, key=lambda s: s[0] / s[1]):
        members = [e for e in plan.entries if tuple(e["bin_shape"]) == shape][:per_bin]
        rows.append((f"smart bin {shape[0]}x{shape[1]} ({plan.bin_shapes[shape]} images)", binned, members, shape))
    fig, axes = plt.subplots(len(rows), per_bin, figsize=(2.2 * per_bin, 2.4 * len(rows)), squeeze=False)
    for r, (title, transform, members, shape) in enumerate(rows):
        for c in range(per_bin):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(members):
                continue
            img = transform(members[c] if transform is binned else {k: v for k, v in members[c].items() if k != "bin_shape"})["image"][0]
            shown = np.stack([img.numpy().T] * 3, -1)  # (H, W) in radiological display: first axis is width
            pad = (img.numpy().T == 0)
            shown[pad] = (0.2, 0.35, 0.7)  # padding and pure black borders in blue
            ax.imshow(np.clip(shown, 0, 1), interpolation="nearest")
            if c == 0:
                ax.set_title(title, fontsize=8, loc="left")
    fig.suptitle("What the model gets: pad-to-square vs smart bins (blue: zero pixels, i.e. padding and black borders)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="generated radiographs (plus the real ones)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bins", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed steps per strategy")
    p.add_argument("--markdown", default=None)
    p.add_argument("--picture", default=None, help="also draw a batch of each bin into this PNG (docs/images/binning.png)")
    p.add_argument("--picture-only", action="store_true", help="draw the picture and stop")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    from medssl.data.scan import scan_folder

    folder = make_set(Path(tempfile.mkdtemp(prefix="medssl_binning_")), args.n)
    entries = scan_folder(folder, progress=False, salt="bench").entries
    sizes = np.array([max(e["shape"]) for e in entries if "gen_" in str(e["image"])]) / 0.25
    if args.picture:
        draw_bins([e for e in entries if "gen_" in str(e["image"])], args.size, args.patch, args.bins, args.batch_size, args.picture)
        print(f"wrote {args.picture}")
        if args.picture_only:
            return
    rows = []
    for mode in ("none", "strict", "smart"):
        r = measure(entries, mode, args.size, args.patch, args.batch_size, args.bins, args.steps)
        rows.append(r)
        print(f"{mode:6} padding {r['padding']:.3f} background {r['background']:.3f} dropped {r['dropped']:4d} "
              f"{r['samples_s']:.2f} samples/s {r['image_tokens_s']:.0f} image tokens/s full-grid {r['full_s']:.2f} samples/s "
              f"[{r['bin_report']}]", flush=True)
    from medssl.engine.trainer import autocast_dtype

    amp = autocast_dtype("cpu", "auto")
    names = {"none": "pad to square", "strict": "strict binning", "smart": f"smart binning ({args.bins} bins)"}
    table = [f"{len(entries)} radiographs ({args.n} generated in the standard detector formats, longest side "
             f"{sizes.min():.0f}-{sizes.max():.0f} px at native scale, with collimation borders; plus the real X-rays and fundus "
             f"photographs), longest side {args.size}, patch {args.patch}, batch {args.batch_size}; MAE (ViT-tiny, global "
             f"attention) for {args.steps} timed steps; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"autocast {amp}.", "",
             "| batching | bins | images per epoch | discarded | mean batch | padding tokens | background tokens (padding + borders) | "
             "MAE samples/s | MAE image tokens/s | whole-image encoder samples/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {names[r['mode']]} | {r['bins']} | {r['images']} | {r['dropped']} | {r['mean_batch']:.1f} | {r['padding']:.1%} | "
              f"{r['background']:.1%} | {r['samples_s']:.2f} | {r['image_tokens_s']:.0f} | {r['full_s']:.2f} |" for r in rows]
    get = {r["mode"]: r for r in rows}
    table.append(f"\nSmart binning spends {get['none']['padding'] / max(get['smart']['padding'], 1e-9):.1f}x fewer tokens on padding "
                 f"than pad-to-square (target >= 2x) and discards {get['smart']['dropped']} images; strict binning discards "
                 f"{get['strict']['dropped']} of {len(entries)} ({get['strict']['dropped'] / len(entries):.0%}). "
                 f"Bins: {get['smart']['bin_report'].split(': ', 1)[1]}.")
    publish("\n".join(table), "binning", args.markdown)


if __name__ == "__main__":
    main()
