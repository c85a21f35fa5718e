"""Feature extraction on Ray vs the local engine, and Ray from 1 to 2 workers.

Generated JPEG photos (~500x375), resnet50 with random weights, a fresh cache
for every measurement, all on this machine:

1. overhead: the Ray engine with one actor given every CPU vs the local engine
   (the same decode, resize and model code; the difference is Ray: shipping
   rows and features, the actor's start). Target: steady state >= 0.9x.
2. scaling: two actors with one CPU each vs one actor with one CPU.

Each figure is given twice: end to end (the extractor's whole compute call,
including the actors' start: importing TensorFlow and building the model), and
steady (images after the first returned batch / time from the first to the
last batch). The local engine is measured before Ray starts and again after it
stops; the baseline is the mean.

    python bench/bench_ray.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import emit, write_photo_folder

import numpy as np

FULL = {"images": 192, "size": 224, "batch": 32}
QUICK = {"images": 192, "size": 96, "batch": 16}


class Clock:
    """A progress stand-in that records when each batch came back."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def update(self, count: int) -> None:
        self.marks.append((time.perf_counter(), count))

    def rates(self) -> dict:
        end = self.marks[-1][0]
        total = sum(c for _, c in self.marks)
        first_t, first_c = self.marks[0]
        steady = (total - first_c) / (end - first_t) if end > first_t else float("nan")
        return {"images": total, "seconds": end - self.start, "end_to_end": total / (end - self.start),
                "steady": steady, "first_batch_s": first_t - self.start}


def make_config(root: Path, cache: Path, p: dict, **engine):
    from tl_app.config import Config

    config = Config()
    config.data.root = str(root)
    config.features.cache_dir = str(cache)
    config.backbone.name = "resnet50"
    config.backbone.weights = "none"
    config.backbone.input_size = p["size"]
    config.data.batch_size = p["batch"]
    for key, value in engine.items():
        setattr(config.engine, key, value)
    return config


def measure(extractor_class, config, records, tag: str) -> dict:
    from tl_app.features import FeatureCache, recipe_for

    recipe = recipe_for(config)
    cache = FeatureCache(config.features.cache_dir, recipe)
    extractor = extractor_class(config, recipe)
    dim = extractor.dim()
    out = np.zeros((len(records), dim), np.float32)
    clock = Clock()  # starts after dim(): the local engine has built its model by then, Ray's actors have not
    failed = extractor.compute(records, list(range(len(records))), cache, out, config.data.batch_size, clock)
    assert not failed, failed
    rates = clock.rates()
    print(f"{tag:<28} end to end {rates['end_to_end']:6.2f} img/s ({rates['seconds']:5.1f}s, first batch after "
          f"{rates['first_batch_s']:4.1f}s) | steady {rates['steady']:6.2f} img/s")
    return {"features": out, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, few of them (a couple of minutes)")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL

    import ray

    from tl_app.engines.ray_engine import RayExtractor
    from tl_app.features import Extractor
    from tl_app.train import scan_dataset

    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_photo_folder(tmp / "photos", p["images"])
        records = scan_dataset(make_config(folder, tmp / "scan", p)).records
        print(f"{len(records)} JPEGs ~500x375 -> resnet50 at {p['size']}px, batch {p['batch']}, {cpus} CPUs")

        local_before = measure(Extractor, make_config(folder, tmp / "c-local-1", p), records, "local engine (before)")

        started = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
        ray_start_s = time.perf_counter() - started
        print(f"ray.init (local instance, {cpus} CPUs): {ray_start_s:.1f}s, not counted below")
        try:
            one_all = measure(RayExtractor, make_config(folder, tmp / "c-ray-1x", p, name="ray", num_workers=1,
                                                        cpus_per_worker=float(cpus)),
                              records, f"ray 1 actor x {cpus} CPUs")
            one = measure(RayExtractor, make_config(folder, tmp / "c-ray-1", p, name="ray", num_workers=1,
                                                    cpus_per_worker=1.0), records, "ray 1 actor x 1 CPU")
            two = measure(RayExtractor, make_config(folder, tmp / "c-ray-2", p, name="ray", num_workers=2,
                                                    cpus_per_worker=1.0), records, "ray 2 actors x 1 CPU")
        finally:
            ray.shutdown()
        local_after = measure(Extractor, make_config(folder, tmp / "c-local-2", p), records, "local engine (after)")

    for run in (one_all, one, two):  # the same features, whichever engine computed them
        np.testing.assert_allclose(run["features"], local_before["features"], rtol=0, atol=1e-5)
    local = {key: (local_before[key] + local_after[key]) / 2 for key in ("end_to_end", "steady")}
    results = {
        "images": len(records), "input_size": p["size"], "batch": p["batch"], "cpus": cpus,
        "ray_init_s": round(ray_start_s, 2),
        "local_images_per_s": {k: round(v, 2) for k, v in local.items()},
        "local_before_after_steady": [round(local_before["steady"], 2), round(local_after["steady"], 2)],
        "ray_1x_all_cpus_images_per_s": {k: round(one_all[k], 2) for k in ("end_to_end", "steady")},
        "ray_1x1_images_per_s": {k: round(one[k], 2) for k in ("end_to_end", "steady")},
        "ray_2x1_images_per_s": {k: round(two[k], 2) for k in ("end_to_end", "steady")},
        "overhead_ratio_steady": round(one_all["steady"] / local["steady"], 3),
        "overhead_ratio_end_to_end": round(one_all["end_to_end"] / local["end_to_end"], 3),
        "scaling_2_vs_1_steady": round(two["steady"] / one["steady"], 3),
        "scaling_2_vs_1_end_to_end": round(two["end_to_end"] / one["end_to_end"], 3),
        "actor_first_batch_s": round(one_all["first_batch_s"], 2),
        "features_match_local": True,
    }
    print(f"overhead (ray 1 actor x {cpus} CPUs / local): steady {results['overhead_ratio_steady']:.2f}x, "
          f"end to end {results['overhead_ratio_end_to_end']:.2f}x")
    print(f"scaling (2 actors / 1 actor, 1 CPU each): steady {results['scaling_2_vs_1_steady']:.2f}x, "
          f"end to end {results['scaling_2_vs_1_end_to_end']:.2f}x")
    emit("ray", results)


if __name__ == "__main__":
    main()
