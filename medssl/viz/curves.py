"""Metric-versus-label-fraction curves: the picture of every evaluation and comparison."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["fraction_curves"]


def fraction_curves(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[dict], bool]]]], metrics: Sequence[str],
                    split: str, title: str = ""):
    """One row of panels per entry of ``panels`` (``(row title, series)``), one column per metric.

    Each series is ``(label, rows, dashed)``: ``rows`` are aggregated table rows (``fraction``,
    ``<metric>``, ``<metric>_std``), or a dict of such lists per metric when the rows differ by metric
    (best pooling per metric); drawn as mean with a ±std bar on a log fraction axis, baselines
    dashed, each label in the same colour in every panel. Returns the matplotlib figure (save it
    with :func:`save_figure`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows_of(rows, metric):
        return rows[metric] if isinstance(rows, dict) else rows

    fractions = sorted({r["fraction"] for _, series in panels for _, rows, _ in series for r in rows_of(rows, metrics[0])})
    labels = list(dict.fromkeys(label for _, series in panels for label, _, _ in series))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colour = {label: palette(i % palette.N) for i, label in enumerate(labels)}  # one colour per line in every panel
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(5 * len(metrics), 4 * len(panels)), squeeze=False)
    for axrow, (row_title, series) in zip(axes, panels):
        for ax, metric in zip(axrow, metrics):
            for label, rows, dashed in series:
                rows = sorted(rows_of(rows, metric), key=lambda r: r["fraction"])
                ax.errorbar([r["fraction"] for r in rows], np.array([r[metric] for r in rows]),
                            yerr=np.array([r[f"{metric}_std"] for r in rows]), marker="o", capsize=3,
                            linestyle="--" if dashed else "-", color=colour[label], label=label)
            ax.set_xscale("log")
            ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
            ax.set_xlabel("label fraction")
            ax.set_title(f"{row_title}: {metric} ({split})" if row_title else f"{metric} ({split})")
            ax.grid(alpha=0.3)
        axrow[-1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig
