"""Several encoders' evaluations on the same labelled data, side by side (``medssl compare``).

Each input is the ``results.json`` that ``medssl evaluate`` wrote for one encoder. They must have
been evaluated on the same data file and split with the same label fractions and number of seeds,
which makes their label subsets identical (subsets depend only on the labels, fraction and seed),
so every row of the comparison compares like with like. Baselines (``scratch``, ``resnet18``,
``pixels``) do not depend on the encoder: each is taken once, from the first input that has it,
so the expensive ones need to run for one encoder only.

"Best" rows take, at each label fraction, the pooling with the highest mean of the metric; the
full tables keep every pooling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_write
from .metrics import METRICS
from .protocol import BASELINES, markdown_table

__all__ = ["load_results", "compare_results", "best_rows", "best_table", "write_comparison"]


def load_results(path: str | os.PathLike) -> dict:
    """The ``results.json`` of an evaluation: the file itself or the folder holding it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no results.json here (it is written by `medssl evaluate`)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not a readable results.json ({err})") from None


def compare_results(results: dict[str, dict], poolings: tuple[str, ...] | None = None) -> dict:
    """Merge ``{encoder name: results.json content}`` into one table with an ``encoder`` column.

    ``poolings`` keeps only those poolings of the encoders' rows (baselines are kept), so
    evaluations that ran different pooling sets compare on the ones they share.
    """
    if not results:
        raise ValueError("nothing to compare: give at least one evaluation")
    names = list(results)
    first = results[names[0]]

    def setting(r, key):
        return r.get(key) if key in ("data", "split") else r["plan"][key]

    for name in names[1:]:
        for key in ("data", "split", "fractions", "seeds"):
            if setting(results[name], key) != setting(first, key):
                raise ValueError(f"{name!r} was evaluated with {key} = {setting(results[name], key)!r} but {names[0]!r} with "
                                 f"{setting(first, key)!r}: only evaluations of the same data, split, fractions and seeds compare")
    table, sources = [], {}
    for name in names:
        for row in results[name]["table"]:
            if row["method"] in BASELINES:
                if sources.setdefault(row["method"], name) != name:
                    continue  # already taken from an earlier input: same subsets, same seeds
                table.append({**row, "encoder": "-"})
            elif poolings is None or row["pooling"] in poolings:
                table.append({**row, "encoder": name})
    return {"data": first.get("data"), "split": first["split"], "plan": {k: first["plan"][k] for k in ("fractions", "seeds")},
            "encoders": {name: results[name].get("checkpoint") for name in names}, "baseline_sources": sources,
            "table": table}


def best_rows(table: list[dict], method: str, metric: str) -> dict[str, list[dict]]:
    """Per encoder, the row of ``method`` with the best mean ``metric`` at each fraction (over poolings)."""
    best: dict[str, dict[float, dict]] = {}
    for row in table:
        if row["method"] != method:
            continue
        held = best.setdefault(row["encoder"], {}).get(row["fraction"])
        if held is None or row[metric] > held[metric] or held[metric] != held[metric]:  # NaN never wins
            best[row["encoder"]][row["fraction"]] = row
    return {enc: [rows[f] for f in sorted(rows)] for enc, rows in best.items()}


def best_table(table: list[dict], metric: str) -> list[str]:
    """Markdown lines: per method, each encoder's best pooling at each fraction for ``metric``, baselines last."""
    fractions = sorted({r["fraction"] for r in table})
    methods = [m for m in dict.fromkeys(r["method"] for r in table) if m not in BASELINES]
    best = [r for m in methods for rows in best_rows(table, m, metric).values() for r in rows]
    baselines = [r for r in table if r["method"] in BASELINES]
    return markdown_table(best + baselines, metric, fractions, ("encoder", "method"))


def write_comparison(comparison: dict, out: str | os.PathLike, title: str = "") -> list[Path]:
    """``comparison.json``, ``comparison.md`` (best rows first, then every row) and ``comparison.png``."""
    from ..viz.curves import fraction_curves
    from ..viz.figure import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "comparison.json", "w") as f:
        f.write(json.dumps(comparison, indent=1) + "\n")
    table, split = comparison["table"], comparison["split"]
    fractions = sorted({r["fraction"] for r in table})
    methods = [m for m in dict.fromkeys(r["method"] for r in table) if m not in BASELINES]
    baselines = [r for r in table if r["method"] in BASELINES]
    sources = ", ".join(f"{b} from {n}" for b, n in comparison["baseline_sources"].items()) or "none"
    lines = [f"# {title or 'Comparison of encoders'}", "",
             f"Reported on the **{split}** split of `{comparison['data']}`; mean ± std over {comparison['plan']['seeds']} "
             f"seeds; the same label subsets for every row. Baselines: {sources}. Best = the pooling with the highest "
             "mean at that fraction.", ""]
    for metric in METRICS:
        lines += [f"## {metric}: best pooling", "", *best_table(table, metric), ""]
    for metric in METRICS:
        lines += [f"## {metric}: every pooling", "", *markdown_table(table, metric, fractions, ("encoder", "method", "pooling")), ""]
    (out / "comparison.md").write_text("\n".join(lines))

    panels = []  # one row of panels per method: each encoder's best pooling (per metric), baselines dashed
    for method in methods:
        best = {metric: best_rows(table, method, metric) for metric in METRICS}
        series = [(enc, {metric: best[metric][enc] for metric in METRICS}, False) for enc in best[METRICS[0]]]
        series += [(b, [r for r in baselines if r["method"] == b], True) for b in dict.fromkeys(r["method"] for r in baselines)]
        panels.append((method, series))
    fig = fraction_curves(panels, METRICS, split, title)
    return [out / "comparison.json", out / "comparison.md", save_figure(fig, out / "comparison.png")]
