"""Comparing several encoders' evaluations: like-with-like checks, baselines taken once, best pooling, reports, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.cli import main
from medssl.eval.compare import best_rows, compare_results, load_results, paired_differences, paired_table, write_comparison
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


def _per_seed(auc_by_seed: dict, fractions=(0.01, 1.0)) -> dict:
    """A results.json whose probe AUC with (pooling) on seed s is auc_by_seed[pooling][s] at every fraction."""
    seeds = len(next(iter(auc_by_seed.values())))
    records = [{"method": "probe", "pooling": p, "fraction": f, "seed": s, "split": "val", "n_train": 10,
                "accuracy": 0.5, "balanced_accuracy": 0.5, "auc": v[s]}
               for p, v in auc_by_seed.items() for f in fractions for s in range(seeds)]
    return {"split": "val", "data": "/data/x.npz", "plan": {"fractions": list(fractions), "seeds": seeds},
            "records": records, "table": aggregate(records)}


def test_paired_differences_cancel_the_shared_luck_of_each_subset():
    # seed 1's subset is bad for both encoders: unpaired, their ± (0.2) swamps a steady 0.02 lead
    reference = _per_seed({"cls": [0.90, 0.50, 0.70], "mean": [0.10, 0.10, 0.10]})
    rival = _per_seed({"cls": [0.0, 0.0, 0.0], "mean": [0.92, 0.53, 0.71]})  # its best pooling is mean
    comparison = compare_results({"mae": reference, "simclr": rival})
    paired = paired_differences(comparison, "simclr", "mae", "probe", "auc")
    assert set(paired) == {0.01, 1.0}
    assert paired[0.01]["differences"] == pytest.approx([0.02, 0.03, 0.01])
    assert paired[0.01]["mean"] == pytest.approx(0.02) and paired[0.01]["std"] == pytest.approx(0.01)
    assert (paired[0.01]["wins"], paired[0.01]["n"]) == (3, 3)
    assert (paired[1.0]["n"], paired[1.0]["differences"]) == (1, pytest.approx([0.02]))  # all labels: one subset
    assert paired_table(comparison, "auc") == [
        "| encoders | method | 0.01 labels | 1 labels |", "|---|---|---:|---:|",
        "| simclr − mae | probe | +0.020 ± 0.010 (3/3) | +0.020 ± 0.000 (1/1) |"]
    assert paired_table(comparison, "auc", reference="simclr")[2].startswith("| mae − simclr | probe | -0.020 ± 0.010 (0/3)")
    with pytest.raises(ValueError, match="'dino' is not among"):
        paired_table(comparison, "auc", reference="dino")
    assert paired_differences(comparison, "simclr", "mae", "knn", "auc") == {}  # no knn rows


def test_reports_and_cli_carry_the_paired_differences(tmp_path, capsys):
    write_reports(_per_seed({"cls": [0.90, 0.50, 0.70]}), tmp_path / "mae", "mae")
    write_reports(_per_seed({"cls": [0.85, 0.52, 0.75]}), tmp_path / "dino", "dino")
    args = ["compare", f"mae={tmp_path / 'mae'}", f"dino={tmp_path / 'dino'}", "--out", str(tmp_path / "cmp")]
    assert main(args + ["--reference", "dino"]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## auc: paired differences vs dino" in md and "| mae − dino | probe | -0.007 ± 0.051 (1/3) | +0.050 ± 0.000 (1/1) |" in md
    assert main(args + ["--reference", "resnet"]) != 0
    assert "--reference 'resnet' is not among" in capsys.readouterr().err
    single = write_comparison(compare_results({"mae": _per_seed({"cls": [0.9, 0.5]})}), tmp_path / "one")
    assert "paired" not in single[1].read_text()  # nothing to pair with
