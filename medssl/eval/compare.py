"""Several encoders' evaluations on the same labelled data, side by side (``medssl compare``).

Each input is the ``results.json`` that ``medssl evaluate`` wrote for one encoder. They must have
been evaluated on the same data file and split with the same label fractions and number of seeds,
which makes their label subsets identical (subsets depend only on the labels, fraction and seed),
so every row of the comparison compares like with like. Baselines (``scratch``, ``resnet18``,
``pixels``) do not depend on the encoder: each is taken once, from the first input that has it,
so the expensive ones need to run for one encoder only.

"Best" rows take, at each label fraction, the pooling with the highest mean of the metric; the
full tables keep every pooling.

Because the subsets are identical, two encoders can also be compared **paired**: on each seed both
saw the same few labelled images, so the per-seed difference cancels the luck of the draw that
dominates the ± of each row at 1 % labels (one unlucky subset drags every encoder down together).
:func:`paired_differences` gives the mean and std of those differences and how many seeds the
encoder won.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_write
from .metrics import METRICS
from .protocol import BASELINES, markdown_table

__all__ = ["load_results", "compare_results", "best_rows", "best_table", "paired_differences", "paired_table",
           "write_comparison"]


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
    table, records, sources = [], [], {}
    for name in names:
        for row in results[name]["table"]:
            if row["method"] in BASELINES:
                if sources.setdefault(row["method"], name) != name:
                    continue  # already taken from an earlier input: same subsets, same seeds
                table.append({**row, "encoder": "-"})
            elif poolings is None or row["pooling"] in poolings:
                table.append({**row, "encoder": name})
        records += [{**r, "encoder": name} for r in results[name].get("records", [])
                    if r["method"] not in BASELINES and (poolings is None or r["pooling"] in poolings)]
    return {"data": first.get("data"), "split": first["split"], "plan": {k: first["plan"][k] for k in ("fractions", "seeds")},
            "encoders": {name: results[name].get("checkpoint") for name in names}, "baseline_sources": sources,
            "table": table, "records": records}


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


def paired_differences(comparison: dict, encoder: str, reference: str, method: str, metric: str) -> dict[float, dict]:
    """Per fraction, ``encoder - reference`` on ``metric`` seed by seed (same label subsets), each at its best pooling.

    Returns ``{fraction: {"mean", "std", "wins", "n", "differences"}}`` (std 0 for one seed);
    fractions where either encoder lacks per-seed records are left out. At fraction 1 every seed
    has the same subset (all labels), so only the first seed counts.
    """
    import numpy as np

    best = best_rows(comparison["table"], method, metric)
    if encoder not in best or reference not in best:
        return {}
    pooling = {name: {r["fraction"]: r["pooling"] for r in best[name]} for name in (encoder, reference)}
    per_seed: dict[str, dict[tuple[float, int], float]] = {encoder: {}, reference: {}}
    for r in comparison.get("records", []):
        if r["method"] == method and r["encoder"] in per_seed and pooling[r["encoder"]].get(r["fraction"]) == r["pooling"]:
            per_seed[r["encoder"]][(r["fraction"], r["seed"])] = r[metric]
    out = {}
    for fraction in sorted(pooling[encoder]):
        seeds = sorted(s for f, s in per_seed[encoder] if f == fraction and (f, s) in per_seed[reference])
        if fraction >= 1.0:  # every seed's subset is the whole training set: one comparison, not several
            seeds = seeds[:1]
        diff = np.array([per_seed[encoder][fraction, s] - per_seed[reference][fraction, s] for s in seeds], dtype=float)
        diff = diff[np.isfinite(diff)]
        if len(diff):
            out[fraction] = {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                             "wins": int((diff > 0).sum()), "n": len(diff), "differences": diff.tolist()}
    return out


def paired_table(comparison: dict, metric: str, reference: str | None = None) -> list[str]:
    """Markdown lines: every other encoder minus ``reference`` (default: the first), per method and fraction,
    as ``mean ± std (wins/seeds)`` of the per-seed differences; empty without per-seed records."""
    names = list(comparison["encoders"])
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"reference encoder {reference!r} is not among the compared ones: {names}")
    fractions = sorted({r["fraction"] for r in comparison["table"]})
    methods = [m for m in dict.fromkeys(r["method"] for r in comparison["table"]) if m not in BASELINES]
    rows = []
    for method in methods:
        for name in names:
            if name == reference:
                continue
            paired = paired_differences(comparison, name, reference, method, metric)
            if paired:
                cells = [f"{paired[f]['mean']:+.3f} ± {paired[f]['std']:.3f} ({paired[f]['wins']}/{paired[f]['n']})"
                         if f in paired else "" for f in fractions]
                rows.append(f"| {name} − {reference} | {method} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["| encoders | method | " + " | ".join(f"{f:g} labels" for f in fractions) + " |",
            "|---|---|" + "---:|" * len(fractions), *rows]


def write_comparison(comparison: dict, out: str | os.PathLike, title: str = "", reference: str | None = None) -> list[Path]:
    """``comparison.json``, ``comparison.md`` (best rows, paired differences vs ``reference`` (default: the
    first encoder), then every row) and ``comparison.png``."""
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
    reference = reference or next(iter(comparison["encoders"]))
    for metric in METRICS:
        paired = paired_table(comparison, metric, reference)
        if paired:
            lines += [f"## {metric}: paired differences vs {reference}", "",
                      "Seed by seed on the same label subsets, each encoder at its best pooling: mean ± std of the "
                      "differences (seeds the encoder won / seeds).", "", *paired, ""]
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
