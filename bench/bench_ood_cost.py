"""What the in-graph OOD score costs at inference: the same weights exported with and without it.

Trains one small bottleneck run (VGG16, random weights unless ``--weights``)
with ``train.ood`` = ``--ood`` (knn, the default, or mahalanobis), copies it with run.json's ``ood`` set to none,
exports both as SavedModels and times ``predict_pixels`` on both in
alternating rounds in this process (bench_calibration's timer). The figure is
the ratio of per-image times, scored / plain; on a shared, loaded machine read
ratios near 1 as "no measurable cost". A second row is issue 16's target:
calibration and scoring together, against a third copy with neither (no
temperature layer, no score).

    python bench/bench_ood_cost.py [--quick] [--size 64] [--weights none|hed-vgg16] [--ood knn|mahalanobis]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench_calibration import CLASSES, time_ratio
from common import emit


def main() -> int:
    from tl_app.api import train
    from tl_app.core.config import Config
    from tl_app.data.sample import write_sample_dataset
    from tl_app.export.exporter import export_run

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--ood", default="knn", choices=["knn", "mahalanobis"])
    args = parser.parse_args()
    rounds = 10 if args.quick else 30
    with tempfile.TemporaryDirectory(prefix="bench-ood-cost-") as tmp:
        work = Path(tmp)
        write_sample_dataset(work / "data", seed=21, counts={c: 20 for c in CLASSES})
        config = Config().with_overrides({
            "data.root": str(work / "data"), "backbone.name": "vgg16", "backbone.weights": args.weights,
            "backbone.input_size": args.size, "features.cache_dir": str(work / "cache"),
            "train.runs_dir": str(work / "runs"), "head.units": [64], "train.epochs": 3, "train.batch_size": 16,
            "train.ood": args.ood, "train.name": "scored"})
        summary = train(config, echo=None)
        run_dir = Path(summary["run_dir"])
        record = json.loads((run_dir / "run.json").read_text())["ood"]
        plain_run = work / "runs" / "plain"
        shutil.copytree(run_dir, plain_run)
        info = json.loads((plain_run / "run.json").read_text())
        info["ood"] = {"method": "none"}
        (plain_run / "run.json").write_text(json.dumps(info))
        bare_run = work / "runs" / "bare"
        shutil.copytree(plain_run, bare_run)
        info["calibration"] = {"method": "none"}
        (bare_run / "run.json").write_text(json.dumps(info))
        temperature = json.loads((run_dir / "run.json").read_text()).get("calibration", {}).get("temperature")
        scored = export_run(run_dir, root=work / "models", name="scored", formats="savedmodel", echo=None)["path"]
        plain = export_run(plain_run, root=work / "models", name="plain", formats="savedmodel", echo=None)["path"]
        bare = export_run(bare_run, root=work / "models", name="bare", formats="savedmodel", echo=None)["path"]
        cost = [time_ratio(scored, plain, args.size, batch, rounds) for batch in (1, 32)]
        both = [time_ratio(scored, bare, args.size, batch, rounds) for batch in (1, 32)]
    for c in cost:
        print(f"inference, batch {c['batch']:>2}: {c['plain_ms']:.3f} ms/image without the OOD score, "
              f"{c['calibrated_ms']:.3f} with it: ratio {c['ratio']:.4f} (SavedModel predict_pixels, "
              f"median of {rounds} alternating rounds; {args.ood}, feature dim {record.get('dim')})")
    for c in both:
        print(f"inference, batch {c['batch']:>2}: {c['plain_ms']:.3f} ms/image with neither calibration nor score, "
              f"{c['calibrated_ms']:.3f} with both (temperature {temperature}): ratio {c['ratio']:.4f}")
    emit("ood_cost", {"method": args.ood, "weights": args.weights, "size": args.size, "ood": record,
                      "inference_cost": [{"batch": c["batch"], "plain_ms": c["plain_ms"],
                                          "scored_ms": c["calibrated_ms"], "ratio": c["ratio"]} for c in cost],
                      "calibration_and_score_cost": [{"batch": c["batch"], "bare_ms": c["plain_ms"],
                                                      "both_ms": c["calibrated_ms"], "ratio": c["ratio"]}
                                                     for c in both]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
