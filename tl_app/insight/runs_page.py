"""The HTML page of 'tl-app runs compare': metrics, differing settings and every run's curves on shared axes.

Kept apart from insight.runs so that listing runs never loads matplotlib.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

from tl_app.core.files import atomic_write_text
from tl_app.insight.plots import plt, png_data_uri, save_figure
from tl_app.insight.runs import metric, read_epochs
from tl_app.training.diagnosis import series


def plot_comparison(labels: list[str], histories: list[list[dict]], path: Path) -> Path:
    """Validation loss and accuracy of every run on shared axes (training values dotted)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, epochs) in enumerate(zip(labels, histories)):
        colour = colours[i % len(colours)]
        x = list(range(1, len(epochs) + 1))
        for ax, key in ((axes[0], "loss"), (axes[1], "accuracy")):
            ax.plot(x, series(epochs, "val_" + key), "-o", markersize=3, color=colour, label=f"{label} (val)")
            ax.plot(x, series(epochs, key), ":", color=colour, label=f"{label} (train)")
    for ax, key in ((axes[0], "loss"), (axes[1], "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


STYLE = ("body{font-family:system-ui,sans-serif;margin:24px;color:#24292f}table{border-collapse:collapse;"
         "font-size:13px;margin:8px 0 18px}th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left}"
         "th{background:#f6f8fa}img{max-width:100%}.note{color:#57606a;font-size:13px}")


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_comparison_page(result: dict, out: str | Path) -> Path:
    """One self-contained HTML page (curves embedded) of a ``compare_runs`` result."""
    out = Path(out)
    runs = result["runs"]
    histories = [read_epochs(Path(r["path"])) for r in runs]
    labels = [r["label"] for r in runs]
    with tempfile.TemporaryDirectory() as tmp:
        curves = png_data_uri(plot_comparison(labels, histories, Path(tmp) / "curves.png"))
    metrics = [[r["label"], r["status"], r["strategy"], r["backbone"], r["weights"], metric(r["val_accuracy"]),
                metric(r["val_loss"]), r["best_epoch"] if r["best_epoch"] is not None else "-", r["epochs"]]
               for r in runs]
    differences = result["differences"]
    config = (html_table(["setting", *labels], [[k, *map(json.dumps, v)] for k, v in differences.items()])
              if differences else '<p class="note">The runs were configured identically.</p>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title>"
            f"<style>{STYLE}</style></head><body><h1>Run comparison</h1>"
            f"<h2>Metrics</h2>" + html_table(["run", "status", "strategy", "backbone", "weights", "val_accuracy",
                                             "val_loss", "best epoch", "epochs"], metrics)
            + f"<h2>Settings that differ</h2>{config}"
            + f"<h2>Curves</h2><img alt='curves' src='{curves}'></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, page)
