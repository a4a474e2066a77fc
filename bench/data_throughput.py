"""Loading throughput: files on disk -> 3D patch tensors, medssl vs plain MONAI, uncached vs cached.

Each configuration runs in its own subprocess so its peak memory (max RSS) is its own.
Figures are volumes per second over whole passes of the data set (single process, no
DataLoader workers, so the numbers compare the pipelines and not the parallelism).

    python bench/data_throughput.py                       # print the table
    python bench/data_throughput.py --markdown docs/benchmarks.md   # and record it there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish



def _pipelines(kind: str, patch: int, samples: int):
    from monai.transforms import (Compose, EnsureTyped, LoadImaged, Orientationd, RandSpatialCropSamplesd,
                                  ScaleIntensityRanged, SpatialPadd)

    from medssl.data.pipeline import build_transforms

    if kind == "medssl":
        return build_transforms(spatial_dims=3, size=patch, num_samples=samples, ct_windows="abdomen")
    return Compose([  # the same job written with plain MONAI transforms
        LoadImaged(keys="image", image_only=True, ensure_channel_first=True, reader="ITKReader"),
        Orientationd(keys="image", axcodes="RAS", labels=None),
        ScaleIntensityRanged(keys="image", a_min=-150, a_max=250, b_min=0, b_max=1, clip=True),
        SpatialPadd(keys="image", spatial_size=patch),
        RandSpatialCropSamplesd(keys="image", roi_size=patch, num_samples=samples, random_size=False),
        EnsureTyped(keys="image", track_meta=False),
    ])


def _entries(kind: str, fmt: str, data: Path):
    from medssl.data.scan import scan_folder

    folder = data / ("ct_dicom" if fmt == "dicom" else "ct_nifti")
    entries = scan_folder(folder, progress=False, salt="bench").entries
    if kind == "monai":  # MONAI reads a DICOM series from its folder
        return [{"image": os.path.dirname(e["image"][0]) if fmt == "dicom" else e["image"]} for e in entries]
    return entries


def run_one(kind: str, fmt: str, cache: str, data: Path, patch: int, samples: int, epochs: int) -> dict:
    from medssl.data.dataset import build_dataset

    entries = _entries(kind, fmt, data)
    transform = _pipelines(kind, patch, samples)
    transform.set_random_state(0)
    t0 = time.perf_counter()
    ds = build_dataset(entries, transform, cache=None if cache == "none" else cache, progress=False,
                       cache_dir=tempfile.mkdtemp() if cache == "disk" else None, num_workers=2)
    fill = time.perf_counter() - t0
    if cache != "none":  # one warm-up pass (fills a disk cache; memory cache is already full)
        for i in range(len(ds)):
            ds[i]
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(ds)):
            out = ds[i]
            assert out[0]["image"].shape[1:] == (patch,) * 3
    seconds = time.perf_counter() - t0
    return {"pipeline": kind, "format": fmt, "cache": cache, "volumes_per_s": len(ds) * epochs / seconds,
            "cache_fill_s": fill, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(192, 192, 96), help="phantom volume size (voxels)")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="patches per volume per visit")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--markdown", default=None, help="write the table into this file between the markers")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: kind,fmt,cache,data
    args = p.parse_args()
    if args.one:
        kind, fmt, cache, data = args.one.split(",", 3)
        print(json.dumps(run_one(kind, fmt, cache, Path(data), args.patch, args.samples, args.epochs)))
        return

    from medssl.data.synthetic import make_phantoms

    data = Path(tempfile.mkdtemp(prefix="medssl_bench_"))
    make_phantoms(data, n_cases=args.cases, shape=tuple(args.shape), spacing=(1.8, 1.8, 3.0), formats=("dicom", "nifti"), progress=False)
    rows = []
    for fmt in ("dicom", "nifti"):
        for kind, cache in (("monai", "none"), ("medssl", "none"), ("monai", "memory"), ("medssl", "memory"), ("medssl", "disk")):
            cmd = [sys.executable, __file__, "--one", f"{kind},{fmt},{cache},{data}", "--patch", str(args.patch),
                   "--samples", str(args.samples), "--epochs", str(args.epochs)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                sys.exit(f"{kind}/{fmt}/{cache} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{fmt:6} {kind:7} cache={cache:6} {r['volumes_per_s']:8.2f} vol/s  fill {r['cache_fill_s']:6.2f} s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    table = [f"Phantom CT, {args.cases} volumes of {'x'.join(map(str, args.shape))} voxels, {args.samples} patches of "
             f"{args.patch}^3 per visit, {args.epochs} passes, single process; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             "| format | pipeline | cache | volumes/s | cache fill (s) | peak RSS (MB) |", "|---|---|---|---:|---:|---:|"]
    table += [f"| {r['format']} | {r['pipeline']} | {r['cache']} | {r['volumes_per_s']:.2f} | {r['cache_fill_s']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    for fmt in ("dicom", "nifti"):
        get = {(r["pipeline"], r["cache"]): r["volumes_per_s"] for r in rows if r["format"] == fmt}
        table.append(f"\n{fmt}: medssl cached / uncached = {get[('medssl', 'memory')] / get[('medssl', 'none')]:.1f}x; "
                     f"medssl / plain MONAI uncached = {get[('medssl', 'none')] / get[('monai', 'none')]:.2f}x, "
                     f"cached = {get[('medssl', 'memory')] / get[('monai', 'memory')]:.2f}x")
    publish("\n".join(table), "data_throughput", args.markdown)


if __name__ == "__main__":
    main()
