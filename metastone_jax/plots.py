"""The evaluation's figures: accuracy against thinking compute (scaling.png) and the reliability diagram of step
scores (calibration.png). Matplotlib is imported on first use, with the file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metastone_jax.tts import METHODS

_LABELS = {"maj": "majority vote", "wmaj": "SPRM-weighted vote", "sprm": "SPRM best-of-k", "oracle": "oracle"}
_STYLES = {"maj": "s--", "wmaj": "D-.", "sprm": "o-", "oracle": "^:"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(metrics: dict, path: Path) -> None:
    """Accuracy against thinking compute (parameters x generated tokens per question), a line per method."""
    import matplotlib.ticker

    plt = _pyplot()
    modes = metrics["modes"]
    figure, axes = plt.subplots(figsize=(6, 4))
    one_sample = metrics["parameters"] * metrics["mean_response_tokens"]
    axes.scatter([one_sample], [metrics["pass@1"]], color="black", label="pass@1 (one sample)", zorder=3)
    for method in METHODS:
        xs = [m["compute"] for m in modes.values()]
        ys = [m[f"{method}@{m['k']}"] for m in modes.values()]
        axes.plot(xs, ys, _STYLES[method], label=_LABELS[method])
        for mode, x, y in zip(modes, xs, ys):
            if method == "sprm":
                axes.annotate(mode, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor labels of a short decade overlap
    axes.set_xlabel("thinking compute per question (parameters x generated tokens)")
    axes.set_ylabel("accuracy")
    axes.set_title("Test-time scaling")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_calibration(metrics: dict, path: Path) -> None:
    """Reliability diagram of step scores: per score bin, the fraction of right steps against the mean score, over
    a histogram of how many steps fall in each bin (`metrics` holds tts.step_metrics' keys)."""
    plt = _pyplot()
    calibration = metrics["step_calibration"]
    edges = np.asarray(calibration["bin_edges"])
    count = np.asarray(calibration["count"])
    filled = count > 0
    figure, (reliability, histogram) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    reliability.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    reliability.plot(
        np.asarray(calibration["mean_score"])[filled],
        np.asarray(calibration["fraction_right"])[filled],
        "o-",
        label="SPRM step scores",
    )
    reliability.set_ylabel("fraction of right steps")
    reliability.set_ylim(-0.02, 1.02)
    reliability.set_title(
        f"Step calibration: AUROC {metrics['step_auroc']:.3f}, ECE {calibration['ece']:.3f}, "
        f"{metrics['steps_checked']} steps",
        fontsize=10,
    )
    reliability.grid(alpha=0.3)
    reliability.legend(fontsize=8, loc="upper left")
    histogram.bar(edges[:-1], count, width=np.diff(edges), align="edge", edgecolor="white")
    histogram.set_xlabel("step score (sigmoid of the SPRM logit)")
    histogram.set_ylabel("steps")
    histogram.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
