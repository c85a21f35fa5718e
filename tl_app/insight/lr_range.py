"""The learning-rate range test's plot: loss against rate, log scale, with the suggestion marked."""

from __future__ import annotations

from pathlib import Path

from tl_app.insight.plots import GOOD, NEUTRAL, plt, save_figure


def plot_lr_range(result: dict, path: str | Path) -> Path:
    """Raw losses (light), the smoothed loss (bold) and a line at the suggested rate."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["rates"], result["losses"], color=NEUTRAL, alpha=0.25, linewidth=1, label="loss per step")
    ax.plot(result["rates"], result["smoothed"], color=NEUTRAL, linewidth=2, label="smoothed loss")
    if result.get("suggested"):
        ax.axvline(result["suggested"], color=GOOD, linestyle="--",
                   label=f"suggested {result['suggested']:.1e}")
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if v == v and v != float("inf")]
    if finite:  # keep the divergence from flattening the useful part of the curve
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"Learning-rate range test ({result.get('backbone', '')}, {result.get('steps', 0)} steps)")
    ax.legend(loc="upper left")
    return save_figure(fig, path)
