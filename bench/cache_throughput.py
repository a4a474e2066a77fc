"""Loader throughput with and without a preprocessed disk cache, at 0, 1 and 2 DataLoader workers.

Compares, on phantom CT DICOM series (the slowest format to read): no cache; medssl's
``SharedCacheDataset`` (MONAI's ``PersistentDataset`` with stat-aware keys and in-folder atomic
writes); and MONAI's ``LMDBDataset`` (one LMDB database; needs ``pip install lmdb``). Each row is
whole passes over the data through a ``DataLoader`` with the training pipeline's random patches,
after one pass that fills the cache (its time, with the dataset's construction, is the "fill"
column: LMDBDataset fills its database when it is made). Each configuration runs in its own process.

    python bench/cache_throughput.py                       # print the table
    python bench/cache_throughput.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish


def run_one(cache: str, workers: int, data: Path, patch: int, epochs: int) -> dict:
    import torch
    from monai.data import DataLoader, LMDBDataset

    from medssl.data.cache import SharedCacheDataset
    from medssl.data.dataset import build_dataset
    from medssl.data.pipeline import build_transforms
    from medssl.data.scan import scan_folder

    entries = scan_folder(data / "ct_dicom", progress=False, salt="bench").entries
    transform = build_transforms(spatial_dims=3, size=patch, num_samples=2)
    folder = tempfile.mkdtemp(prefix="medssl_cache_")
    t0 = time.perf_counter()  # LMDBDataset fills its database when it is made: the fill counts from here
    if cache == "none":
        ds = build_dataset(entries, transform, cache=None)
    elif cache == "shared":
        ds = SharedCacheDataset(entries, transform, folder)
    else:
        ds = LMDBDataset(entries, transform, cache_dir=folder, progress=False)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, shuffle=True, persistent_workers=workers > 0,
                        collate_fn=lambda batch: batch)
    for _ in loader:  # fills the cache (or, without one, is a plain first pass)
        pass
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return {"cache": cache, "workers": workers, "volumes_s": n / seconds, "fill_s": fill, "cache_mb": size / 2**20,
            "threads": torch.get_num_threads()}


NAMES = {"none": "none", "shared": "SharedCacheDataset (PersistentDataset files)", "lmdb": "MONAI LMDBDataset"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 160, 80))
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--markdown", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        cache, workers, data = args.one.split(",", 2)
        print(json.dumps(run_one(cache, int(workers), Path(data), args.patch, args.epochs)))
        return
    from medssl.data.synthetic import make_phantoms

    data = Path(tempfile.mkdtemp(prefix="medssl_bench_"))
    make_phantoms(data, n_cases=args.cases, shape=tuple(args.shape), spacing=(2.0, 2.0, 3.0), formats=("dicom",), progress=False)
    try:
        import lmdb  # noqa: F401
        caches = ("none", "shared", "lmdb")
    except ImportError:
        print("lmdb is not installed: LMDBDataset rows left out (pip install lmdb)", file=sys.stderr)
        caches = ("none", "shared")
    rows = []
    for cache in caches:
        for workers in (0, 1, 2):
            cmd = [sys.executable, __file__, "--one", f"{cache},{workers},{data}", "--patch", str(args.patch), "--epochs", str(args.epochs)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                sys.exit(f"{cache}/{workers} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{cache:7} workers={workers} {r['volumes_s']:7.2f} volumes/s  fill {r['fill_s']:6.2f} s  cache {r['cache_mb']:.0f} MB",
                  flush=True)
    table = [f"Phantom CT DICOM, {args.cases} series of {'x'.join(map(str, args.shape))} voxels, 2 random {args.patch}^3 patches per "
             f"volume, batches of 2, {args.epochs} passes after the fill; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             "| cache | workers | volumes/s | first pass / fill (s) | on disk (MB) |", "|---|---:|---:|---:|---:|"]
    table += [f"| {NAMES[r['cache']]} | {r['workers']} | {r['volumes_s']:.2f} | {r['fill_s']:.2f} | {r['cache_mb']:.0f} |" for r in rows]
    publish("\n".join(table), "cache_throughput", args.markdown)


if __name__ == "__main__":
    main()
