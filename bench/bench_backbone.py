"""Raw backbone throughput: model.predict on in-memory tensors, 224x224, batch 32.

The reference every later pipeline is compared with (extraction, predict,
fine-tuning); the ratio printed is resnet50 against vgg16, both measured in this run.

    python bench/bench_backbone.py [--quick]
"""

from __future__ import annotations

import argparse

from common import emit, predict_throughput


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    from tl_app.models.backbones import build_feature_model, get_spec

    batches = 2 if args.quick else 6
    results = {}
    for name in ("resnet50", "vgg16"):
        model = build_feature_model(get_spec(name), args.size, "none")
        ips = predict_throughput(model, args.size, batch=32, batches=batches)
        results[name] = {"images_per_s": round(ips, 2)}
        print(f"{name:<10} {ips:7.2f} images/s")
    ratio = results["resnet50"]["images_per_s"] / results["vgg16"]["images_per_s"]
    print(f"resnet50 / vgg16 throughput ratio: {ratio:.2f}")
    emit("backbone", {"size": args.size, "batch": 32, **results, "resnet50_over_vgg16": round(ratio, 2)})


if __name__ == "__main__":
    main()
