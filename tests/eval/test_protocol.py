"""The evaluation plan: every method and baseline on the same subsets, aggregation, reports, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.eval.labelled import load_labelled
from medssl.eval.protocol import EvalPlan, aggregate, run_evaluation, write_reports
from medssl.models import ViT


def _splits(spatial_dims=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def data(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.rand(n, 1, *[16] * spatial_dims, generator=g) * 0.2
        x[y == 1, :, :8] += 0.8
        return x, y
    return {"train": data(60), "val": data(20)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_plan_runs_every_method_on_the_same_subsets(spatial_dims, tmp_path):
    plan = EvalPlan(fractions=(0.1, 1.0), seeds=2, poolings=("cls", "mean"), epochs=1)
    result = run_evaluation(lambda pretrained: ViT(spatial_dims, 1, patch_size=4, size="micro"), _splits(spatial_dims), plan,
                            progress=False)
    records = result["records"]
    assert result["split"] == "val"
    # seeds x fractions x (probe/knn x poolings + finetune + scratch/resnet18/pixels + random probe/knn x poolings)
    assert len(records) == 2 * 2 * (2 * 2 + 1 + 3 + 2 * 2)
    for seed in (0, 1):  # frozen methods see the same number of labels at a given seed and fraction
        sizes = {r["n_train"] for r in records if r["seed"] == seed and r["fraction"] == 0.1 and r["method"] in ("probe", "knn", "pixels")}
        assert len(sizes) == 1
    assert {r["method"] for r in records} >= {"random-probe", "random-knn"}
    random_rows = {(r["method"], r["pooling"], r["fraction"], r["seed"]): r["auc"] for r in records if r["method"].startswith("random-")}
    pretrained = {(r["method"], r["pooling"], r["fraction"], r["seed"]): r["auc"] for r in records if r["method"] in ("probe", "knn")}
    assert len(random_rows) == len(pretrained) == 16  # beside every frozen row, the same row on a random encoder
    pixels = [r for r in records if r["method"] == "pixels" and r["fraction"] == 1.0]
    assert all(r["auc"] == 1.0 for r in pixels)  # the bright half separates the classes in pixel space
    files = write_reports(result, tmp_path, "tiny")
    assert [f.name for f in files] == ["results.json", "results.md", "results.png"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"split", "plan", "records", "table"} <= set(saved)
    assert {"method", "pooling", "fraction", "seed", "split", "n_train", "accuracy", "balanced_accuracy", "auc"} <= set(saved["records"][0])
    assert "± " in (tmp_path / "results.md").read_text()


def test_aggregate_mean_and_std_over_seeds():
    records = [{"method": "probe", "pooling": "cls", "fraction": 0.1, "accuracy": a, "balanced_accuracy": a, "auc": float("nan")}
               for a in (0.6, 0.8)]
    (row,) = aggregate(records)
    assert row["seeds"] == 2 and row["accuracy"] == pytest.approx(0.7) and row["accuracy_std"] == pytest.approx(0.1)
    assert np.isnan(row["auc"])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        EvalPlan(methods=("probe", "rotation"))


def test_labelled_csv_without_splits_gets_a_stratified_val(tmp_path):
    from medssl.data.synthetic import make_phantoms

    data = make_phantoms(tmp_path / "ph", n_cases=10, shape=(24, 24, 12), spacing=(10.0, 10.0, 12.0), formats=("xray",),
                         progress=False)
    splits = load_labelled(data / "labels_xray.csv", spatial_dims=2, size=32)
    assert set(splits) == {"train", "val"}
    assert splits["train"][0].shape[1:] == (1, 32, 32)
    assert sorted(splits["val"][1].tolist()) == [0, 1] and len(splits["train"][1]) == 8
    with pytest.raises(ValueError, match="npz, a CSV"):
        load_labelled(data / "labels.csv".replace("labels.csv", "xray"), spatial_dims=2)

    # the same cohort as a MONAI datalist: its sections are the splits
    import csv

    rows = list(csv.DictReader(open(data / "labels_xray.csv")))
    entry = lambda r: {"image": str(data / r["image"]), "label": int(r["label"])}  # noqa: E731
    datalist = {"training": [entry(r) for r in rows[:7]], "validation": [entry(r) for r in rows[7:]]}
    (tmp_path / "cohort.json").write_text(json.dumps(datalist))
    splits = load_labelled(tmp_path / "cohort.json", spatial_dims=2, size=32)
    assert len(splits["train"][1]) == 7 and len(splits["val"][1]) == 3
    assert splits["val"][1].tolist() == [int(r["label"]) for r in rows[7:]]


def test_benchmark_end_to_end_on_the_phantoms(tmp_path, capsys):
    from medssl.cli import main
    from medssl.data.synthetic import make_phantoms

    data = make_phantoms(tmp_path / "ph", n_cases=10, shape=(40, 36, 20), spacing=(8.0, 8.0, 10.0), formats=("nifti",),
                         progress=False)
    out = tmp_path / "bench"
    args = ["-q", "benchmark", "--bundle", "mae_ct_3d", "--data", str(data / "labels_ct.csv"), "--out", str(out),
            "--max-epochs", "1", "--size", "micro", "--image-size", "16", "--patch-size", "4", "--set", "window_size=2",
            "--set", "cache=none", "--fractions", "0.5,1", "--seeds", "1", "--epochs", "1", "--poolings", "mean"]
    assert main(args) == 0
    saved = json.loads((out / "evaluation" / "results.json").read_text())
    methods = {r["method"] for r in saved["records"]}
    assert methods == {"probe", "knn", "finetune", "scratch", "resnet18", "pixels", "random-probe", "random-knn"}
    assert (out / "pretrain" / "models" / "model.pt").is_file() and (out / "evaluation" / "results.png").is_file()
    assert "auc" in capsys.readouterr().out
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # the same command again: the folder holds a run
    assert main([*args, "--resume"]) == 0  # a finished benchmark: nothing to train, the journal skips every run
    assert json.loads((out / "evaluation" / "results.json").read_text())["records"] == saved["records"]


def test_a_killed_evaluation_resumes_from_its_journal(tmp_path, monkeypatch):
    from medssl.eval import protocol
    from medssl.eval.journal import Journal

    plan = EvalPlan(fractions=(0.5, 1.0), seeds=1, methods=("probe", "knn"), baselines=("pixels",), poolings=("mean",))
    header = {"checkpoint": "a.pt", "plan": {"seeds": 1}}
    make = lambda pretrained: ViT(2, 1, patch_size=4, size="micro")  # noqa: E731
    calls = []
    real_probe = protocol.linear_probe_scores

    def probe_that_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third probe: killed mid-plan
            raise KeyboardInterrupt
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(protocol, "linear_probe_scores", probe_that_dies)
    path = tmp_path / "records.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(make, _splits(2), plan, progress=False, journal=Journal(path, header))
    assert len(path.read_text().splitlines()) == 1 + 3  # header, probe + knn + pixels at fraction 0.5
    with open(path, "a") as f:
        f.write('{"method": "probe", "pool')  # a line cut off by the kill
    monkeypatch.setattr(protocol, "linear_probe_scores", real_probe)
    resumed = run_evaluation(make, _splits(2), plan, progress=False, journal=Journal(path, header))
    fresh = run_evaluation(make, _splits(2), plan, progress=False)
    assert resumed["records"] == fresh["records"] and len(resumed["records"]) == 6
    assert len(path.read_text().splitlines()) == 1 + 6
    with pytest.raises(ValueError, match="another evaluation"):
        Journal(path, {"checkpoint": "b.pt", "plan": {"seeds": 1}})


def test_finetune_pooling_reaches_the_classifier_from_the_command_line():
    from medssl.cli import _plan, build_parser

    args = build_parser().parse_args(["evaluate", "--checkpoint", "c.pt", "--data", "d.npz", "--out", "o",
                                      "--methods", "finetune", "--baselines", "", "--finetune-pooling", "mean"])
    plan = _plan(args)
    assert plan.finetune_pooling == "mean" and plan.baselines == ()
    plan = EvalPlan(fractions=(1.0,), seeds=1, methods=plan.methods, baselines=(), finetune_pooling=plan.finetune_pooling, epochs=1)
    seen = []

    def encoder(pretrained):
        net = ViT(2, 1, patch_size=4, size="micro", cls_token=False)  # mean pooling needs no CLS token
        seen.append(pretrained)
        return net
    (record,) = run_evaluation(encoder, _splits(2), plan, progress=False)["records"]
    assert (record["method"], record["pooling"]) == ("finetune", "mean") and seen == [True]


def test_frozen_methods_on_the_full_label_set_are_computed_once_for_all_seeds(monkeypatch):
    import medssl.eval.protocol as protocol

    calls = []
    real = protocol.linear_probe_scores

    def counted(train_x, train_y, query_x, seed=0):
        calls.append((train_x.shape, seed))
        return real(train_x, train_y, query_x, seed=seed)
    monkeypatch.setattr(protocol, "linear_probe_scores", counted)
    plan = EvalPlan(fractions=(0.5, 1.0), seeds=3, methods=("probe",), baselines=("pixels",), poolings=("mean",))
    records = run_evaluation(lambda pretrained: ViT(2, 1, patch_size=4, size="micro"), _splits(2), plan, progress=False)["records"]
    assert len(records) == 3 * 2 * 2  # every (seed, fraction, method) is still recorded
    full = [shape[0] == 60 for shape, _ in calls]  # 60 training images: the full label set
    assert sum(full) == 2  # at 100 %: once for the probe, once for pixels, not once per seed
    assert len(calls) == 2 + 3 * 2  # at 50 % the subsets differ by seed: computed each time
    for method in ("probe", "pixels"):
        at_full = [r for r in records if r["method"] == method and r["fraction"] == 1.0]
        assert len({r["auc"] for r in at_full}) == 1 and [r["seed"] for r in at_full] == [0, 1, 2]
