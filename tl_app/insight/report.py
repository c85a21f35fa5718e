"""One self-contained HTML page per run: config, data, curves, diagnosis,
evaluation, confusion matrix, top losses and a few explanations.

Images are embedded as base64 data URIs and the CSS is inline, so the file can
be mailed, attached to a ticket or opened offline.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

from tl_app.core.errors import TlAppError
from tl_app.insight.plots import png_data_uri
from tl_app.insight.curves import CURVES_FILE, write_training_report
from tl_app.training.diagnosis import DIAGNOSIS_FILE, HISTORY_FILE
from tl_app.insight.evaluate import evaluate, informative_top_k
from tl_app.models.opener import open_model
from tl_app.insight.explain import GradCam, explain
from tl_app.insight.patches import class_feature_patches
from tl_app.models.artifacts import read_run_info
from tl_app.data.manifest import Manifest

SECTIONS = ("summary", "choices", "config", "data", "curves", "diagnosis", "evaluation", "calibration", "confusion-matrix",
            "top-losses",
            "explanations", "features-see")

PAGE_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:#24292f}
header{background:#24292f;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #d0d7de;font-size:13px}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
"""  # the frame every tl-app HTML page shares (report, doctor)

STYLE = PAGE_STYLE + """main{padding:8px 32px 40px;max-width:1150px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}th{background:#f6f8fa}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eaeef2;margin:6px 0}
pre{background:#f6f8fa;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.kpi{display:inline-block;margin:4px 22px 4px 0}.kpi b{display:block;font-size:22px}
.diag{font-size:15px;padding:10px 14px;border-radius:6px}.healthy{background:#dafbe1}
.over-fitting,.under-fitting{background:#fff8c5}.unknown{background:#eaeef2}.note{color:#57606a;font-size:13px}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def image_tag(path: str | Path, alt: str) -> str:

    path = Path(path)
    if not path.is_file():
        return f'<p class="note">({esc(alt)}: not available)</p>'
    return f'<img alt="{esc(alt)}" src="{png_data_uri(path)}">'


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{esc(title)}</h2>{body}</section>'


def ensure_curves(run_dir: Path) -> dict | None:

    if (run_dir / DIAGNOSIS_FILE).is_file() and (run_dir / CURVES_FILE).is_file():
        return json.loads((run_dir / DIAGNOSIS_FILE).read_text())
    if (run_dir / HISTORY_FILE).is_file():
        return write_training_report(run_dir)
    return None


def ensure_evaluation(run_dir: Path, run_info: dict, evaluate_missing: bool) -> tuple[dict | None, str]:
    """The run's evaluation (computed on its validation split when missing); else why not."""
    path = run_dir / "evaluation" / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text()), ""
    if not evaluate_missing:
        return None, "no evaluation yet: run 'tl-app evaluate RUN_DIR'"
    data_root = run_info.get("data_root")
    if not data_root or not Path(data_root).is_dir():
        return None, f"the training data ({data_root}) is not available to evaluate on"
    last_error = ""
    for split in ("val", "test", "all"):
        try:
            return evaluate(run_dir, data_root, split=split, out_dir=run_dir / "evaluation", echo=None), ""
        except TlAppError as exc:
            last_error = str(exc)
    return None, f"evaluation failed: {last_error}"


def ensure_explanations(run_dir: Path, metrics: dict | None, count: int) -> dict | None:
    """Explanations for the highest-loss images (Grad-CAM, or occlusion when the conv map is 1x1)."""
    images = [item["path"] for item in (metrics or {}).get("top_losses", [])][:count]
    if not images or count <= 0:
        return None
    out = run_dir / "explanations" / "report"
    existing = sorted(out.glob("explanations_*.json")) if out.is_dir() else []
    if existing:
        return json.loads(existing[0].read_text())
    loaded = open_model(run_dir, keras=True)
    if GradCam(loaded.model, loaded.backbone).map_shape != (1, 1):
        return explain(run_dir, images, "gradcam", out_dir=out, echo=None, loaded=loaded)
    patch = max(4, loaded.input_size // 4)  # no spatial detail for Grad-CAM: occlusion says more
    return explain(run_dir, images, "occlusion", patch=patch, stride=max(2, patch // 2), out_dir=out, echo=None,
                   loaded=loaded)


def ensure_feature_patches(run_dir: Path) -> tuple[dict | None, str]:
    """Per class, the units the head weighs most and the image regions that excite them (insight.patches)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None, "no manifest.json in this run"
    records = [r for r in Manifest.load(path).records if Path(r.path).is_file()]
    if not records:
        return None, "the run's images are not available"
    try:
        return class_feature_patches(run_dir, records, run_dir / "patches" / "report"), ""
    except TlAppError as exc:
        return None, str(exc)


def build_report(run_dir: str | Path, out: str | Path | None = None, evaluate_missing: bool = True,
                 explanations: int = 3, echo=print) -> Path:
    """Write run_dir/report.html (or ``out``) and return its path."""
    say = echo or (lambda *a, **k: None)
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    diagnosis = ensure_curves(run_dir)
    metrics, why_no_eval = ensure_evaluation(run_dir, info, evaluate_missing)
    explained = ensure_explanations(run_dir, metrics, explanations) if metrics else None
    parts = [
        section("summary", "Summary", summary_body(run_dir, info, metrics, diagnosis)),
        section("choices", "Backbone and learning rate", choices_body(run_dir, info)),
        section("config", "Configuration", config_body(run_dir)),
        section("data", "Data", data_body(run_dir)),
        section("curves", "Training curves", image_tag(run_dir / "curves.png", "training curves")
                if diagnosis else '<p class="note">no training history (history.json) in this run</p>'),
        section("diagnosis", "Diagnosis", diagnosis_body(diagnosis)),
        section("evaluation", "Evaluation", evaluation_body(metrics, why_no_eval)),
        section("calibration", "Calibration", calibration_body(metrics)),
        section("confusion-matrix", "Confusion matrix", confusion_body(metrics)),
        section("top-losses", "Top losses", image_tag(Path(metrics["files"]["top_losses.png"]), "top losses")
                if metrics else '<p class="note">no evaluation</p>'),
        section("explanations", "Explanations", explanations_body(explained)),
        section("features-see", "What the features see", features_body(*ensure_feature_patches(run_dir))),
    ]
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS)
    title = f"tl-app report: {run_dir.name}"
    generated = dt.datetime.now().isoformat(timespec="seconds")
    document = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(info.get('strategy', ''))} &middot; {esc(info.get('backbone', ''))}"
        f" &middot; generated {esc(generated)}</p></header><nav>{nav}</nav><main>{''.join(parts)}</main>"
        f"</body></html>"
    )
    path = Path(out) if out else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    say(f"report: {path}")
    return path


# ---- section bodies ------------------------------------------------------------
def summary_body(run_dir: Path, info: dict, metrics: dict | None, diagnosis: dict | None) -> str:
    kpis = []
    if metrics:
        kpis += [("accuracy", f"{metrics['accuracy']:.3f}"),
                 *([(f"top-{metrics['top_k']} accuracy", f"{metrics['top_k_accuracy']:.3f}")]
                   if informative_top_k(metrics) else []),
                 ("evaluated images", metrics["count"])]
    val = (info.get("metrics") or {}).get("val_accuracy")
    if val is not None:
        kpis.append(("val accuracy (training)", f"{val:.3f}"))
    if diagnosis:
        kpis.append(("diagnosis", diagnosis["diagnosis"]))
    boxes = "".join(f'<span class="kpi"><b>{esc(v)}</b>{esc(k)}</span>' for k, v in kpis)
    rows = [[key, info.get(key, "")] for key in ("strategy", "backbone", "input_size", "resize_policy", "weights",
                                                 "pooling", "created", "data_root")]
    rows.append(["classes", ", ".join(info.get("classes", []))])
    return boxes + table(["run", str(run_dir.name)], rows)


def choices_body(run_dir: Path, info: dict) -> str:
    """What train --backbone auto and --lr auto chose, and why (run.json); else that they were configured."""
    parts = []
    selection = info.get("backbone_selection")
    if selection:
        rows = [[row["backbone"] + (" (chosen)" if row["backbone"] == selection["recommended"] else ""),
                 f"{row['probe_accuracy']:.3f} ± {row['probe_accuracy_sd']:.3f}", f"{row['macro_f1']:.3f}",
                 f"{row['images_per_second']:.1f}", f"{row['params']:,}"] if row["status"] == "probed"
                else [row["backbone"], row["status"], "", "", ""] for row in selection["table"]]
        parts.append(f"<p>Backbone <b>{esc(selection['recommended'])}</b>: {esc(selection['why'])}.</p>"
                     + table(["backbone", "probe accuracy", "macro-F1", "images/s", "parameters"], rows))
    else:
        parts.append(f"<p>Backbone <b>{esc(info.get('backbone', ''))}</b>, as configured.</p>")
    found = info.get("lr_find")
    if found:
        rate = f"{found['used']:.2e}"
        parts.append(f"<p>Learning rate <b>{esc(rate)}</b>: {esc(found['why'])} "
                     f"({found['steps']} steps of the range test).</p>"
                     + image_tag(run_dir / found["plot"], "learning-rate range test"))
    else:
        parts.append('<p class="note">Learning rate as configured (train --lr auto runs the range test).</p>')
    return "".join(parts)


SPLIT_SETTINGS = ("val_fraction", "test_fraction", "split_seed")


def config_body(run_dir: Path) -> str:
    path = run_dir / "config.toml"
    text = path.read_text() if path.is_file() else "(no config.toml)"
    try:
        layout = json.loads((run_dir / "manifest.json").read_text()).get("layout")
    except (OSError, ValueError):
        layout = None
    if layout == "split-folders":  # the user's own train/val/test folders: the split settings did nothing
        text = "\n".join(line + "  # unused: the dataset's own train/val/test folders were used"
                         if line.split("=")[0].strip() in SPLIT_SETTINGS else line for line in text.splitlines())
    return f"<pre>{esc(text)}</pre>"


def data_body(run_dir: Path) -> str:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return '<p class="note">no manifest.json</p>'
    manifest = Manifest.load(path)
    counts = manifest.counts()
    rows = [[c, counts[c]["train"], counts[c]["val"], counts[c]["test"], sum(counts[c].values())]
            for c in manifest.classes]
    rows.append(["total", *(sum(counts[c][s] for c in manifest.classes) for s in ("train", "val", "test")),
                 len(manifest.records)])
    body = f"<p>{esc(manifest.root)} ({esc(manifest.layout)}): {esc(manifest.summary_line())}</p>"
    body += table(["class", "train", "val", "test", "total"], rows)
    if manifest.skipped:
        body += "<p>Skipped files:</p>" + table(["path", "reason"], [[s.path, s.reason] for s in manifest.skipped[:50]])
    for warning in manifest.warnings:
        body += f'<p class="note">warning: {esc(warning)}</p>'
    return body


def diagnosis_body(diagnosis: dict | None) -> str:
    if not diagnosis:
        return '<p class="note">no training history to diagnose</p>'
    remedies = "".join(f"<li>{esc(r)}</li>" for r in diagnosis.get("remedies", []))
    return (f'<p class="diag {esc(diagnosis["diagnosis"])}">{esc(diagnosis.get("line", diagnosis["diagnosis"]))}</p>'
            f"<p>Usual remedies:</p><ul>{remedies}</ul>")


def evaluation_body(metrics: dict | None, why: str) -> str:
    if not metrics:
        return f'<p class="note">{esc(why)}</p>'
    body = (f"<p>{esc(metrics['count'])} images of the <b>{esc(metrics['split'])}</b> split of "
            f"{esc(metrics['data'])}: accuracy {metrics['accuracy']:.4f}, "
            + (f"top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}, " if informative_top_k(metrics) else "")
            + f"mean NLL {metrics.get('nll', metrics.get('loss', float('nan'))):.4f} "
            f"(splits from {esc(metrics.get('splits_from', 'a fresh scan'))}).</p>")
    rows = [[name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
            for name, m in metrics["per_class"].items()]
    for avg in ("macro", "weighted"):
        m = metrics[avg]
        rows.append([f"{avg} avg", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", metrics["count"]])
    body += table(["class", "precision", "recall", "F1", "support"], rows)
    if metrics.get("most_confused"):
        body += "<p>Most confused pairs:</p>" + table(
            ["true", "predicted", "count", "share of true class"],
            [[p["true"], p["predicted"], p["count"], f"{p['fraction_of_true']:.2f}"] for p in metrics["most_confused"]])
    if metrics.get("skipped_count"):
        body += f'<p class="note">{metrics["skipped_count"]} file(s) skipped (see skipped.csv)</p>'
    return body


def calibration_body(metrics: dict | None) -> str:
    """ECE, MCE, NLL and Brier before and after the temperature, and the reliability diagram."""
    calibration = (metrics or {}).get("calibration")
    if not calibration:
        return '<p class="note">no calibration figures (evaluate the run again with this version)</p>'
    before, after = calibration["before"], calibration.get("after")
    if after is None:
        body = ('<p>The model applies no temperature (trained with <code>--calibration none</code>, or before '
                'calibration existed): its probabilities are the raw softmax.</p>')
    else:
        body = (f"<p>Temperature <b>{calibration['temperature']:.3f}</b>, fitted on the validation split when "
                f"training ended and applied inside every exported format. ECE uses {before['bins']} equal-width "
                f"confidence bins.</p>")
    columns = [before] + ([after] if after else [])
    header = ["figure", "before (T = 1)"] + (["after"] if after else [])
    rows = [[label, *[f"{c[key]:.4f}" for c in columns]] for label, key in (
        ("expected calibration error (ECE)", "ece"), ("maximum calibration error (MCE)", "mce"),
        ("negative log-likelihood", "nll"), ("Brier score", "brier"), ("accuracy", "accuracy"))]
    body += table(header, rows)
    diagram = (metrics.get("files") or {}).get("reliability_diagram.png")
    if diagram and Path(diagram).is_file():
        body += image_tag(diagram, "reliability diagram")
    selective = metrics.get("selective")
    if selective:
        body += ("<p>Selective prediction: the accuracy of the answers kept when the least confident images are "
                 "withheld (ranked by top probability); AURC is the mean error over the curve, lower is better.</p>")
        body += table(["coverage", "accuracy"], [[f"{float(c):.0%}", f"{a:.4f}"]
                                                 for c, a in selective["accuracy_at_coverage"].items()])
    curve = (metrics.get("files") or {}).get("risk_coverage.png")
    if curve and Path(curve).is_file():
        body += image_tag(curve, "risk-coverage curve")
    return body + ood_body(metrics.get("ood"))


def ood_body(figures: dict | None) -> str:
    """evaluate --ood-folder: AUROC and the outside images accepted, Mahalanobis against max-softmax."""
    if not figures:
        return ""
    if "error" in figures:
        return f'<p class="note">out-of-distribution folder: {esc(figures["error"])}</p>'
    key = f"fpr_at_{round(figures['acceptance'] * 100)}"
    body = (f"<p>Out-of-distribution folder ({figures['mahalanobis']['ood_images']} images) against the evaluated "
            f"split: AUROC (1 = every outside image scores above every inside one) and the share of outside images "
            f"still accepted at the threshold accepting {figures['acceptance']:.0%} of the inside ones.</p>")
    rows = [[name, f"{figures[name]['auroc']:.4f}", f"{figures[name][key]:.4f}"]
            for name in ("mahalanobis", "max_softmax")]
    own = figures.get("model")
    if own:
        rows.insert(0, [f"the model's own ({own['method']})", f"{own['auroc']:.4f}", f"{own[key]:.4f}"])
        body += (f"<p>At the threshold the model answers \"unknown\" with ({own['model_threshold']:.4g}), it accepts "
                 f"{own['in_accepted_at_model_threshold']:.1%} of the evaluated split and "
                 f"{own['ood_accepted_at_model_threshold']:.1%} of the outside images.</p>")
    return body + table(["scorer", "AUROC", f"outside accepted at {figures['acceptance']:.0%}"], rows)


def confusion_body(metrics: dict | None) -> str:
    if not metrics:
        return '<p class="note">no evaluation</p>'
    files = metrics["files"]
    return (image_tag(files["confusion_matrix.png"], "confusion matrix")
            + image_tag(files["confusion_matrix_normalized.png"], "normalised confusion matrix"))


def features_body(summary: dict | None, why: str) -> str:
    if not summary:
        return f'<p class="note">no feature patches: {esc(why)}</p>'
    body = (f"<p>{esc(summary['source'])}, layer {esc(summary['layer'])} (receptive field "
            f"{summary['receptive_field']:g} px), over {summary['images']} of the run's images. For each class, "
            f"the units with the largest positive head weights ({esc(summary['class_weights'])}), and the regions "
            f"of the images that excite each unit most, one row per unit.</p>")
    for item in summary["classes"]:
        units = ", ".join(f"{u['unit']} ({u['weight']:.3g})" for u in item["units"]) or "none with a positive weight"
        body += f"<h3>{esc(item['class'])}</h3><p>units (weight): {esc(units)}</p>"
        if item["units"]:
            body += image_tag(item["sheet"], f"patches of the units {item['class']} rests on")
    return body


def explanations_body(summary: dict | None) -> str:
    if not summary or not summary.get("results"):
        return '<p class="note">no explanations (no evaluated images)</p>'
    body = f"<p>Method: {esc(summary['method'])}, for the images with the highest loss.</p>"
    for result in summary["results"]:
        body += image_tag(result["png"], f"{summary['method']} for {Path(result['image']).name}")
    return body
