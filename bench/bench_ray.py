"""Feature extraction on Ray vs the local engine, and Ray from 1 to 2 workers.

Generated JPEG photos (~500x375), resnet50 with random weights, a fresh cache
for every run, all on this machine:

1. overhead: the Ray engine with the whole machine (one actor per CPU) vs the
   local engine, which also uses every CPU (the same decode, resize and model
   code; the difference is Ray: shipping rows and features, starting actors).
   The full run also tries one actor given every CPU.
2. scaling: two actors with one CPU each vs one actor with one CPU.

Two figures per run. "steady": images that came back after every worker's
first chunk / time from the last of those to the last chunk (the engine at
work, start-up excluded). "end to end": all images / the whole call, from building the model
(local) or starting the actors (Ray) to the last feature. ray.init is not
counted. The local engine is measured before Ray starts and again after it
stops; its baseline is the mean.

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

FULL = {"images": 512, "size": 224, "batch": 32, "one_actor_all_cpus": True}
QUICK = {"images": 384, "size": 128, "batch": 16, "one_actor_all_cpus": False}


class Clock:
    """A progress stand-in that notes when each chunk of features came back."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def update(self, count: int) -> None:
        self.marks.append((time.perf_counter(), count))


def make_config(root: Path, cache: Path, p: dict, **engine):
    from tl_app.core.config import Config

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


def measure(extractor_class, folder: Path, tmp: Path, records, p: dict, tag: str, **engine) -> dict:
    """One extraction of every record into a fresh cache, timed chunk by chunk."""
    from tl_app.features.cache import FeatureCache
    from tl_app.features.recipe import recipe_for

    config = make_config(folder, tmp / f"cache-{tag.replace(' ', '-')}", p, **engine)
    recipe = recipe_for(config)
    cache = FeatureCache(config.features.cache_dir, recipe)
    clock = Clock()
    started = time.perf_counter()  # building the model (local) or starting the actors (Ray) counts
    extractor = extractor_class(config, recipe)
    out = np.zeros((len(records), extractor.dim()), np.float32)
    failed = extractor.compute(records, list(range(len(records))), cache, out, config.data.batch_size, clock)
    assert not failed, failed
    # every actor's first chunk carries its start-up: count from the last of those on
    warm = min(int(engine.get("num_workers", 1)), len(clock.marks) - 1) - 1
    first, last = clock.marks[0][0], clock.marks[-1][0]
    after = sum(count for _, count in clock.marks[warm + 1:])
    steady = after / (last - clock.marks[warm][0]) if last > clock.marks[warm][0] else float("nan")
    end_to_end = len(records) / (last - started)
    print(f"{tag:<24} steady {steady:6.2f} img/s ({len(clock.marks)} chunks) | end to end {end_to_end:6.2f} img/s "
          f"({last - started:5.1f}s, first chunk after {first - started:4.1f}s)")
    return {"steady": steady, "end_to_end": end_to_end, "first_chunk_s": round(first - started, 2),
            "chunks": len(clock.marks), "features": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, few of them (a couple of minutes)")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL

    import ray

    from tl_app.engines.ray_engine import RayExtractor
    from tl_app.features.extract import Extractor
    from tl_app.data.scan import scan_dataset

    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_photo_folder(tmp / "photos", p["images"])
        records = scan_dataset(make_config(folder, tmp / "scan", p)).records
        print(f"{len(records)} JPEGs ~500x375 -> resnet50 at {p['size']}px, batch {p['batch']}, {cpus} CPUs")

        local_before = measure(Extractor, folder, tmp, records, p, "local (before)")
        started = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
        ray_start_s = time.perf_counter() - started
        print(f"ray.init (local instance, {cpus} CPUs): {ray_start_s:.1f}s, not counted")
        try:
            one_all = None
            if p["one_actor_all_cpus"]:
                one_all = measure(RayExtractor, folder, tmp, records, p, f"ray 1 actor x {cpus} CPUs", name="ray",
                                  num_workers=1, cpus_per_worker=float(cpus))
            one = measure(RayExtractor, folder, tmp, records, p, "ray 1 actor x 1 CPU", name="ray",
                          num_workers=1, cpus_per_worker=1.0)
            two = measure(RayExtractor, folder, tmp, records, p, "ray 2 actors x 1 CPU", name="ray",
                          num_workers=2, cpus_per_worker=1.0)
            every = two
            if cpus > 2:
                every = measure(RayExtractor, folder, tmp, records, p, f"ray {cpus} actors x 1 CPU", name="ray",
                                num_workers=cpus, cpus_per_worker=1.0)
        finally:
            ray.shutdown()
        local_after = measure(Extractor, folder, tmp, records, p, "local (after)")

    ray_runs = [run for run in (one_all, one, two, every) if run is not None]
    diff = max(float(np.abs(run["features"] - local_before["features"]).max()) for run in ray_runs)
    assert diff <= 1e-5, diff  # the same features, whichever engine computed them
    local = {key: (local_before[key] + local_after[key]) / 2 for key in ("end_to_end", "steady")}

    def rates(run):
        return {k: round(run[k], 2) for k in ("steady", "end_to_end")}

    results = {
        "images": len(records), "input_size": p["size"], "batch": p["batch"], "cpus": cpus,
        "ray_init_s": round(ray_start_s, 2),
        "local_images_per_s": rates(local),
        "local_before_after_steady": [round(local_before["steady"], 2), round(local_after["steady"], 2)],
        "ray_1x1_images_per_s": rates(one), "ray_2x1_images_per_s": rates(two),
        f"ray_{cpus}x1_images_per_s": rates(every),
        "overhead_ratio_steady": round(every["steady"] / local["steady"], 3),
        "overhead_ratio_end_to_end": round(every["end_to_end"] / local["end_to_end"], 3),
        "scaling_2_vs_1_steady": round(two["steady"] / one["steady"], 3),
        "scaling_2_vs_1_end_to_end": round(two["end_to_end"] / one["end_to_end"], 3),
        "first_chunk_s": {"local": local_before["first_chunk_s"], "ray_1x1": one["first_chunk_s"],
                          "ray_2x1": two["first_chunk_s"]},
        "features_max_abs_diff_vs_local": diff,
    }
    if one_all is not None:
        results[f"ray_1x{cpus}_images_per_s"] = rates(one_all)
        results["overhead_ratio_steady_one_actor_all_cpus"] = round(one_all["steady"] / local["steady"], 3)
    print(f"overhead (ray {cpus} actors x 1 CPU / local, whole machine): steady "
          f"{results['overhead_ratio_steady']:.2f}x, end to end {results['overhead_ratio_end_to_end']:.2f}x")
    print(f"scaling (2 actors / 1 actor, 1 CPU each): steady {results['scaling_2_vs_1_steady']:.2f}x, "
          f"end to end {results['scaling_2_vs_1_end_to_end']:.2f}x")
    print(f"features: max |ray - local| = {diff:.2e}")
    emit("ray", results)


if __name__ == "__main__":
    main()
