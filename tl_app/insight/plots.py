"""Drawing helpers shared by evaluate, explain, similar, embed and report.

Everything renders with matplotlib's Agg backend to PNG files, so the
pictures come out the same on a headless server as on a laptop.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

import matplotlib
from tl_app.data.images import decode_pil

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GOOD = "#1a7f37"
BAD = "#cf222e"
NEUTRAL = "#24292f"


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def png_data_uri(path: str | Path) -> str:
    """A PNG as a data: URI, for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def load_thumbnail(source, size: int = 128) -> np.ndarray:
    """An RGB uint8 thumbnail of a file (or array); a grey tile if it cannot be read."""
    from PIL import Image


    try:
        array = source if isinstance(source, np.ndarray) else decode_pil(str(source))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        return np.asarray(image)
    except Exception:  # noqa: BLE001 - a bad file becomes a placeholder, never a crash
        return np.full((size, size, 3), 200, np.uint8)


class Tile:
    """One cell of a contact sheet: an image, a caption and the caption's colour."""

    def __init__(self, image, caption: str = "", colour: str = NEUTRAL):
        self.image = image
        self.caption = caption
        self.colour = colour


def contact_sheet(rows: Sequence[Sequence[Tile | None]], path: str | Path, title: str = "",
                  thumb: int = 128, cell_inches: float = 1.9) -> Path:
    """A grid of thumbnails with captions (rows may differ in length; None = empty cell)."""
    rows = [list(r) for r in rows] or [[]]
    ncols = max(1, max(len(r) for r in rows))
    nrows = max(1, len(rows))
    caption_lines = max([t.caption.count("\n") + 1 for r in rows for t in r if t is not None] or [1])
    cell_h = cell_inches + 0.17 * caption_lines
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_inches * ncols, cell_h * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            tile = rows[r][c] if c < len(rows[r]) else None
            if tile is None:
                continue
            ax.imshow(load_thumbnail(tile.image, thumb))
            ax.set_title(tile.caption, fontsize=8, color=tile.colour)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def grid_rows(tiles: Sequence[Tile], ncols: int) -> list[list[Tile]]:
    return [list(tiles[i:i + ncols]) for i in range(0, len(tiles), ncols)]


def confusion_matrix_plot(matrix: np.ndarray, classes: Sequence[str], path: str | Path,
                          normalized: bool = False, title: str = "") -> Path:
    """Rows are true classes, columns predictions; cells annotated when the matrix is small."""
    k = len(classes)
    side = min(22.0, max(4.5, 0.55 * k + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = matrix.astype(float)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalized else max(1.0, shown.max()))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(classes), rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center",
                  fontsize=8 if k > 12 else 10)
    ax.set_yticks(range(k), labels=list(classes), fontsize=8 if k > 12 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        threshold = (1.0 if normalized else max(1.0, shown.max())) / 2
        for i in range(k):
            for j in range(k):
                value = shown[i, j]
                text = f"{value:.2f}" if normalized else f"{int(value)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if k > 12 else 10,
                        color="white" if value > threshold else "black")
    ax.set_title(title or ("confusion matrix (normalised by true class)" if normalized else "confusion matrix"))
    fig.tight_layout()
    return save_figure(fig, path)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map (any size) over an RGB image with the jet colour map."""
    from PIL import Image

    height, width = image.shape[:2]
    heat = np.asarray(heat, np.float32)
    resized = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colours = plt.get_cmap("jet")(np.clip(resized, 0, 1))[..., :3] * 255.0
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(blended, 0, 255).astype(np.uint8)


def explanation_figure(image: np.ndarray, heat: np.ndarray, path: str | Path, title: str) -> Path:
    """Original | heat map | overlay, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(np.clip(image, 0, 255).astype(np.uint8))
    axes[0].set_title("input", fontsize=9)
    shown = axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("heat map", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(heatmap_overlay(image, heat))
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def scatter_2d(points: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: str | Path,
               title: str = "") -> Path:
    """A 2-D scatter coloured by class, with a legend."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    labels = np.asarray(labels)
    markers = "os^Dv<>ph*"
    for i, name in enumerate(classes):
        mask = labels == i
        if not mask.any():
            continue
        ax.scatter(points[mask, 0], points[mask, 1], s=18, alpha=0.8, color=cmap(i % cmap.N),
                   marker=markers[(i // cmap.N) % len(markers)], label=f"{name} ({int(mask.sum())})")
    ax.legend(fontsize=8, loc="best", markerscale=1.5, ncol=1 if len(classes) <= 15 else 2)
    ax.set_title(title)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return save_figure(fig, path)



def reliability_diagram(curves: Sequence[tuple[str, Sequence[dict], float]], path: str | Path, title: str = "") -> Path:
    """Accuracy against confidence per equal-width bin, one panel per (label, bins, ECE); the diagonal is perfect.

    Bars are each bin's accuracy; the red part is the gap to the bin's mean confidence; the
    lower strip shows how many images fall in each bin (a big gap in an empty bin means little).
    """
    fig, axes = plt.subplots(2, len(curves), figsize=(4.2 * len(curves), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for column, (label, bins, ece) in enumerate(curves):
        ax, counts = axes[0][column], axes[1][column]
        width = bins[0]["high"] - bins[0]["low"] if bins else 1.0
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        accuracy = [b["accuracy"] if b["count"] else 0.0 for b in bins]
        confidence = [b["confidence"] if b["count"] else c for b, c in zip(bins, centres)]
        ax.bar(centres, accuracy, width=width * 0.95, color="#0969da", edgecolor="white", label="accuracy")
        ax.bar(centres, [c - a if b["count"] else 0.0 for c, a, b in zip(confidence, accuracy, bins)],
               bottom=accuracy, width=width * 0.95, color=BAD, alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "--", color=NEUTRAL, linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}: ECE {ece:.4f}")
        if column == 0:
            ax.legend(loc="upper left", fontsize=8)
        counts.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="#8c959f")
        counts.set_xlabel("confidence (top-1 probability)")
        counts.set_ylabel("images")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def risk_coverage_plot(curves: Sequence[tuple[str, dict]], path: str | Path, title: str = "") -> Path:
    """Accuracy of the kept answers against the share kept, one line per (label, risk_coverage result)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for label, curve in curves:
        ax.plot(curve["coverage"], curve["accuracy"], linewidth=1.6, label=f"{label} (AURC {curve['aurc']:.4f})")
    if curves:
        full = curves[0][1]["accuracy"][-1] if curves[0][1]["accuracy"] else 0.0
        ax.axhline(full, color=NEUTRAL, linestyle="--", linewidth=1, label=f"no rejection ({full:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy of the answered images")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.25)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
