"""`medssl scan` of large trees: files per second and peak memory at 20,000 and 100,000 DICOM files.

The trees are copies of two real DICOM objects from ``../shared/data/dicom/pydicom_3.0.2`` (the
128x128 CT ``CT_small.dcm`` and the 64x64 MR ``MR_small.dcm``) with new Study / Series / SOP
Instance UIDs, a patient per study and slice positions, in series of ``--slices`` files (one
folder per series, as PACS exports are laid out); every tenth series is a set of single-file 2D
images instead. Each scan runs in its own process, so its peak RSS is its own; the figure that
matters is how RSS grows per file between the two sizes (the entries themselves hold every file's
path, so some growth is inherent).

    python bench/scan_scale.py --sizes 20000,100000                # print the table
    python bench/scan_scale.py --sizes 20000,100000 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from report import publish


def make_tree(root: Path, n_files: int, slices: int = 50) -> Path:
    """``n_files`` DICOM files under ``root`` (reused when a complete tree of that size is already there)."""
    import pydicom
    from pydicom.uid import generate_uid

    done = root / ".complete"
    if done.exists() and done.read_text() == str(n_files):
        return root
    shutil.rmtree(root, ignore_errors=True)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "pydicom_3.0.2"
    if not (shared / "CT_small.dcm").exists():
        sys.exit(f"{shared} not found: this benchmark copies the shared real DICOM files")
    templates = [pydicom.dcmread(shared / name) for name in ("CT_small.dcm", "MR_small.dcm")]
    written, series = 0, 0
    t0 = time.perf_counter()
    while written < n_files:
        ds = templates[series % 2]
        single = series % 10 == 9  # single-file 2D images: every file its own entry
        folder = root / f"patient_{series // 4:06d}" / f"series_{series:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        study, uid = generate_uid(), generate_uid()
        for k in range(min(slices, n_files - written)):
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid() if single else uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"BENCH{series // 4:06d}"
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(k) * 2.5]
            ds.save_as(folder / f"{k:04d}.dcm")
            written += 1
        series += 1
        if series % 200 == 0:
            print(f"  writing: {written}/{n_files} files ({written / (time.perf_counter() - t0):.0f}/s)", file=sys.stderr, flush=True)
    done.write_text(str(n_files))
    return root


def scan_once(root: str, out: str) -> dict:
    from medssl.data.scan import scan_folder, write_datalist

    t0 = time.perf_counter()
    result = scan_folder(root, salt="bench", progress=False, workers=8)
    write_datalist(result, out)
    seconds = time.perf_counter() - t0
    files = sum(len(e["image"]) if isinstance(e["image"], list) else 1 for e in result.entries)
    return {"files": files, "entries": len(result.entries), "skipped": len(result.skipped), "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,100000")
    p.add_argument("--slices", type=int, default=50)
    p.add_argument("--work", default="/tmp/medssl_scan_scale", help="where the trees are written (and kept for reruns)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        root, out = args.one.split(",", 1)
        print(json.dumps(scan_once(root, out)))
        return
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        root = make_tree(Path(args.work) / f"tree_{n}", n, args.slices)
        cmd = [sys.executable, __file__, "--one", f"{root},{Path(args.work) / f'datalist_{n}.json'}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"scan of {n} files failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['files']:7d} files -> {r['entries']} entries in {r['seconds']:.1f} s ({r['files'] / r['seconds']:.0f} files/s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    table = [f"DICOM trees of copies of two real files (CT 128x128, MR 64x64) with new UIDs, series of {args.slices} slices "
             f"(every tenth series single-file 2D images); `scan_folder(workers=8)` + `write_datalist`, one process per "
             f"size; {platform.processor() or platform.machine()}, {os.cpu_count()} cores.", "",
             "| files | entries | seconds | files/s | peak RSS (MB) |", "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['files']} | {r['entries']} | {r['seconds']:.1f} | {r['files'] / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
              for r in rows]
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_file = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / max(1, b["files"] - a["files"])
        table.append(f"\nPeak RSS grows by {per_file:.2f} KB per file between {a['files']} and {b['files']} files.")
    publish("\n".join(table), "scan_scale", args.markdown)


if __name__ == "__main__":
    main()
