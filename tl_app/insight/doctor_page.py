"""The doctor's self-contained HTML page: thumbnails grouped by kind of finding.

Thumbnails are embedded as small JPEG data URIs and the CSS is inline, so the
page opens offline and can be attached to a ticket.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path

from PIL import Image

from tl_app.core.files import atomic_write_text
from tl_app.insight.plots import load_thumbnail
from tl_app.insight.report import PAGE_STYLE

KINDS = ("labels", "duplicates", "outliers", "quality")
TITLES = {"labels": "Label issues", "duplicates": "Duplicates and near-duplicates", "outliers": "Outliers",
          "quality": "Image quality"}
MAX_PER_KIND = 200  # the JSON and CSV hold every finding; the page shows the strongest

STYLE = PAGE_STYLE + """main{padding:8px 32px 40px;max-width:1200px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px}.note{color:#57606a;font-size:13px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.group{border:1px solid #d0d7de;border-radius:6px;padding:6px;
margin:6px 0;display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;width:132px;font-size:11px;line-height:1.3}figure img{width:128px;height:128px;object-fit:contain;
background:#eaeef2;border:1px solid #d0d7de;display:block}figcaption{overflow-wrap:anywhere}
.warn{color:#cf222e;font-weight:600}.kpi{display:inline-block;margin:4px 22px 4px 0}.kpi b{display:block;font-size:22px}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def thumbnail_uri(path: str, size: int = 128) -> str:
    buffer = io.BytesIO()
    Image.fromarray(load_thumbnail(path, size)).save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tile(item: dict, caption: str) -> str:
    return (f'<figure><img alt="{esc(item["relpath"])}" src="{thumbnail_uri(item["path"])}">'
            f'<figcaption><b>{esc(item["relpath"])}</b><br>{caption}</figcaption></figure>')


def section_body(kind: str, items: list) -> str:
    if not items:
        return '<p class="note">Nothing found.</p>'
    shown = items[:MAX_PER_KIND]
    more = (f'<p class="note">{len(items) - len(shown)} more in doctor.json and issues.csv.</p>'
            if len(items) > len(shown) else "")
    if kind == "duplicates":
        blocks = []
        for n, g in enumerate(shown, 1):
            flags = " ".join(x for x in ('<span class="warn">across splits (leakage)</span>'
                                         if g["crosses_splits"] else "",
                                         '<span class="warn">different labels</span>'
                                         if g["label_conflict"] else "") if x)
            head = (f'<p class="note">group {n}: found by {esc(", ".join(g["found_by"]))}, '
                    f'similarity {g["score"]:.3f} {flags}</p>')
            blocks.append(head + '<div class="group">' + "".join(
                tile(m, f'{esc(m["label"])} · {esc(m["split"] or "-")}') for m in g["members"]) + "</div>")
        return "".join(blocks) + more
    if kind == "labels":
        tiles = [tile(f, f'given <b>{esc(f["given_label"])}</b> → <b>{esc(f["suggested_label"])}</b>'
                         f'<br>score {f["score"]:.2f}') for f in shown]
    elif kind == "outliers":
        tiles = [tile(f, f'{esc(f["label"])}, nearest {esc(f["nearest_class"])}<br>score {f["score"]:.3f}')
                 for f in shown]
    else:
        tiles = [tile(f, f'{esc(f["problem"])}: {esc(f["detail"])}') for f in shown]
    return '<div class="tiles">' + "".join(tiles) + "</div>" + more


def write_page(path: str | Path, report: dict, root: str) -> Path:
    """Write doctor.html for a doctor.json dictionary."""
    counts = report["counts"]
    kpis = "".join(f'<span class="kpi"><b>{v}</b>{esc(k.replace("_", " "))}</span>' for k, v in counts.items())
    nav = "".join(f'<a href="#{k}">{TITLES[k]} ({len(report[k])})</a>' for k in KINDS)
    sections = "".join(f'<section id="{k}"><h2>{TITLES[k]} ({len(report[k])})</h2>{section_body(k, report[k])}'
                       f"</section>" for k in KINDS)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tl-app doctor: {esc(root)}</title>'
            f"<style>{STYLE}</style></head><body><header><h1>Dataset doctor</h1>"
            f"<p>{esc(root)} · {report['images']} images · {esc(stamp)} · nothing was moved or deleted; "
            f"edit issues.csv and train with --exclude/--relabel</p></header><nav>{nav}</nav><main>"
            f'<section id="summary"><h2>Summary</h2>{kpis}</section>{sections}</main></body></html>')
    path = Path(path)
    atomic_write_text(path, page)
    return path
