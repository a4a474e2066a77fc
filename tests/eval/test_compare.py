"""Comparing several encoders' evaluations: like-with-like checks, baselines taken once, best pooling, reports, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.cli import main
from medssl.eval.compare import best_rows, compare_results, load_results, write_comparison
from medssl.eval.protocol import aggregate, write_reports


def _result(values: dict, data="/data/x.npz", seeds=2, fractions=(0.1, 1.0)) -> dict:
    """A results.json whose AUC / accuracy for (method, pooling) at fraction f and seed s is values[...] + f / 10 + s / 100."""
    records = [{"method": m, "pooling": p, "fraction": f, "seed": s, "split": "val", "n_train": 10,
                "accuracy": v + f / 10 + s / 100, "balanced_accuracy": v, "auc": v + f / 10 + s / 100}
               for (m, p), v in values.items() for f in fractions for s in range(seeds)]
    return {"split": "val", "data": data, "checkpoint": "/runs/x/models/model.pt",
            "plan": {"fractions": list(fractions), "seeds": seeds}, "records": records, "table": aggregate(records)}


MAE = {("probe", "cls"): 0.6, ("probe", "mean"): 0.7, ("knn", "mean"): 0.55, ("pixels", "-"): 0.5, ("scratch", "cls"): 0.52}
DINO = {("probe", "cls"): 0.8, ("probe", "mean"): 0.75, ("knn", "mean"): 0.65, ("pixels", "-"): 0.1}


def test_merge_keeps_every_encoder_and_takes_each_baseline_once():
    merged = compare_results({"mae": _result(MAE), "dino": _result(DINO)})
    table = merged["table"]
    assert {(r["encoder"], r["method"], r["pooling"]) for r in table if r["encoder"] != "-"} == \
        {(e, m, p) for e, v in (("mae", MAE), ("dino", DINO)) for m, p in v if m not in ("pixels", "scratch")}
    pixels = [r for r in table if r["method"] == "pixels"]
    assert len(pixels) == 2 and all(r["auc"] == pytest.approx(0.5 + r["fraction"] / 10 + 0.005) for r in pixels)  # mae's, not dino's
    assert merged["baseline_sources"] == {"pixels": "mae", "scratch": "mae"}


def test_best_pooling_is_chosen_per_fraction_and_nan_never_wins():
    table = compare_results({"mae": _result(MAE), "dino": _result(DINO)})["table"]
    best = best_rows(table, "probe", "auc")
    assert [r["pooling"] for r in best["mae"]] == ["mean", "mean"] and [r["pooling"] for r in best["dino"]] == ["cls", "cls"]
    assert [r["fraction"] for r in best["dino"]] == [0.1, 1.0]
    for r in table:
        if r["encoder"] == "mae" and r["pooling"] == "mean":
            r["auc"] = float("nan")
    assert [r["pooling"] for r in best_rows(table, "probe", "auc")["mae"]] == ["cls", "cls"]


@pytest.mark.parametrize("change", [{"data": "/data/other.npz"}, {"seeds": 3}, {"fractions": (0.01, 1.0)}])
def test_evaluations_of_different_settings_are_refused(change):
    with pytest.raises(ValueError, match="'dino' was evaluated with"):
        compare_results({"mae": _result(MAE), "dino": _result(DINO, **change)})


def test_reports_hold_the_best_rows_and_a_plot(tmp_path):
    files = write_comparison(compare_results({"mae": _result(MAE), "dino": _result(DINO)}), tmp_path, "toy")
    assert [f.name for f in files] == ["comparison.json", "comparison.md", "comparison.png"]
    md = (tmp_path / "comparison.md").read_text()
    assert "| dino | probe | 0.815 ± 0.005 | 0.905 ± 0.005 |" in md  # best AUC: cls pooling, mean over seeds 0 and 1
    assert "| - | pixels | 0.515 ± 0.005 | 0.605 ± 0.005 |" in md  # baselines beside the best rows
    assert "| mae | probe | cls | 0.615 ± 0.005 |" in md  # the every-pooling table keeps all rows
    assert "Baselines: pixels from mae, scratch from mae" in md
    import matplotlib.pyplot as plt

    image = plt.imread(tmp_path / "comparison.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 1000  # two rows (probe, knn) of three metrics
    assert json.loads((tmp_path / "comparison.json").read_text())["encoders"] == {"mae": "/runs/x/models/model.pt",
                                                                                 "dino": "/runs/x/models/model.pt"}


def test_cli_compares_evaluation_folders_and_names_a_missing_one(tmp_path, capsys):
    for name, values in (("mae", MAE), ("dino", DINO)):
        write_reports(_result(values), tmp_path / name / "evaluation", name)
    assert load_results(tmp_path / "mae" / "evaluation")["split"] == "val"
    rc = main(["compare", str(tmp_path / "mae" / "evaluation"), f"DINO={tmp_path / 'dino' / 'evaluation'}",
               "--out", str(tmp_path / "cmp")])
    assert rc == 0 and "| DINO | probe |" in capsys.readouterr().out  # the first is named after its folder's parent
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["table"]
    assert {r["encoder"] for r in table} == {"mae", "DINO", "-"}
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cmp2")]) != 0
    assert "nowhere: no results.json" in capsys.readouterr().err
    assert not (tmp_path / "cmp2").exists()
    assert np.isfinite([r["auc"] for r in table]).all()


def test_a_line_keeps_its_colour_in_every_row_of_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from medssl.viz import curves

    figures = []
    real = curves.fraction_curves
    monkeypatch.setattr(curves, "fraction_curves", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    monkeypatch.setattr("medssl.viz.figure.save_figure", lambda fig, path: path)
    only_mae = {k: v for k, v in MAE.items() if k[0] != "knn"}  # pixels is the 2nd line in the knn row, the 3rd in the probe row
    write_comparison(compare_results({"dino": _result(DINO), "mae": _result(only_mae)}), tmp_path)
    colours = {}
    for ax in figures[0].axes:
        for bars in ax.containers:  # one ErrorbarContainer per drawn series
            colours.setdefault(bars.get_label(), set()).add(bars.lines[0].get_color())
    assert set(colours) == {"dino", "mae", "pixels", "scratch"} and all(len(c) == 1 for c in colours.values())
    plt.close(figures[0])


def test_pooling_filter_keeps_baselines_and_changes_the_best():
    table = compare_results({"mae": _result(MAE), "dino": _result(DINO)}, poolings=("cls",))["table"]
    assert {r["pooling"] for r in table if r["encoder"] != "-"} == {"cls"}
    assert {r["method"] for r in table if r["encoder"] == "-"} == {"pixels", "scratch"}
    assert [r["pooling"] for r in best_rows(table, "probe", "auc")["mae"]] == ["cls", "cls"]  # mean would win unfiltered
    assert "knn" not in {r["method"] for r in table}  # knn ran with mean pooling only
