"""The medssl command line: fast help, scan / preview / demo write what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from medssl.cli import main


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-c", "import sys, medssl.cli; medssl.cli.main(['--help'])"],
                         capture_output=True, text=True)
    for cmd in ("scan", "preview", "phantoms", "demo"):
        assert cmd in out.stdout
    mods = subprocess.run([sys.executable, "-c", "import sys, medssl.cli; print('monai' in sys.modules, 'torch' in sys.modules)"],
                          capture_output=True, text=True).stdout.split()
    assert mods == ["False", "False"]  # heavy imports happen inside the commands


def test_scan_then_preview(phantoms, tmp_path, capsys):
    assert main(["-q", "scan", str(phantoms), "--out", str(tmp_path / "dl.json")]) == 0
    printed = capsys.readouterr().out
    assert "CT" in printed and "wrote" in printed
    data = json.loads((tmp_path / "dl.json").read_text())
    assert len(data["training"]) == 6
    assert main(["-q", "preview", str(tmp_path / "dl.json"), "--out", str(tmp_path / "pv"), "--size-3d", "16"]) == 0
    pngs = sorted((tmp_path / "pv").glob("*.png"))
    assert [p.name for p in pngs] == ["preview_2d_000.png", "preview_3d_000.png"]
    img = np.asarray(Image.open(pngs[1]))
    assert img.shape[0] > 200 and img.std() > 10  # a real picture, not a blank page


def test_scan_errors_are_clear(tmp_path, capsys):
    assert main(["-q", "scan", str(tmp_path / "missing"), "--out", str(tmp_path / "dl.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["-q", "scan", str(tmp_path / "empty"), "--out", str(tmp_path / "dl.json")]) == 1


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "demo"), "--cases", "2"]) == 0
    out = tmp_path / "demo"
    assert (out / "datalist.json").is_file() and (out / "data" / "labels.csv").is_file()
    assert len(list((out / "preview").glob("preview_*.png"))) == 2
    assert "previews:" in capsys.readouterr().out
