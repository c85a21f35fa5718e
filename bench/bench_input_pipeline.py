"""Input pipeline alone (read, decode, orient, resize to 224, batch 32) vs what
resnet50 predict consumes, on real-size (~500x375) JPEGs. Target: >= 5x.

    python bench/bench_input_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import emit, predict_throughput, write_photo_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=0)
    args = parser.parse_args()
    from tl_app.models.backbones import build_feature_model, get_spec
    from tl_app.data.scan import scan
    from tl_app.data.pipeline import make_dataset

    count = args.images or (320 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photo_folder(tmp, count)
        manifest = scan(root)
        records = manifest.records
        assert all(r.fast for r in records), "plain JPEGs must take the graph decoder"
        ds = make_dataset(records, 224, "center_crop", batch_size=32)
        for _ in ds.take(1):  # warm-up: graph tracing
            pass
        start = time.perf_counter()
        n = sum(int(batch.shape[0]) for batch in ds)
        pipeline_ips = n / (time.perf_counter() - start)

    model = build_feature_model(get_spec("resnet50"), 224, "none")
    model_ips = predict_throughput(model, 224, batch=32, batches=2 if args.quick else 4)
    ratio = pipeline_ips / model_ips
    print(f"input pipeline: {pipeline_ips:8.1f} images/s ({n} JPEGs ~500x375 -> 224, batch 32)")
    print(f"resnet50 predict: {model_ips:6.1f} images/s (in-memory tensors)")
    print(f"ratio pipeline / resnet50: {ratio:.1f}x (target >= 5x)")
    emit("input_pipeline", {"images": n, "pipeline_images_per_s": round(pipeline_ips, 1),
                            "resnet50_images_per_s": round(model_ips, 2), "ratio": round(ratio, 1)})


if __name__ == "__main__":
    main()
