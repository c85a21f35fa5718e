"""A fully cached `tl-app extract`, timed as a whole process, against the first run on the same folder (P2).

The first run imports TensorFlow, builds the backbone and computes every
feature; the re-run finds every feature in the cache and must not import
TensorFlow at all (numpy scan, hashing and cache read). Each figure is the
wall time of the real command in a fresh process, re-runs taken as the median
of three, with Python's bytecode cache on (as users run it).

    python bench/bench_noop.py [--quick]

Targets (issue 17, P2): re-run >= 20x faster than the first run, and <= 1 s,
for 1,000 images at 224 px (full mode). Random weights: the timings are those
of real weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, target_row, write_photo_folder

HERE = Path(__file__).resolve().parent
FULL = {"images": 1000, "size": 224, "backbone": "resnet50", "reruns": 3}
QUICK = {"images": 200, "size": 64, "backbone": "resnet50", "reruns": 3}


# As users run it: Python keeps compiled bytecode (a sandbox's PYTHONDONTWRITEBYTECODE=1 would make every
# process recompile tl-app's sources, about half a second on a busy 2-core machine).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_extract(folder: Path, out: Path, cache: Path, p: dict) -> float:
    command = [sys.executable, "-m", "tl_app", "extract", str(folder), "--backbone", p["backbone"], "--weights",
               "none", "--input-size", str(p["size"]), "--out", str(out), "--cache-dir", str(cache), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['images']} images at {QUICK['size']} px")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp_name:
        tmp = Path(tmp_name)
        folder = write_photo_folder(tmp / "photos", p["images"])
        subprocess.run([sys.executable, "-m", "tl_app", "--help"], capture_output=True, cwd=HERE.parent, env=ENV)
        first = run_extract(folder, tmp / "out", tmp / "cache", p)
        reruns = [run_extract(folder, tmp / f"out-{k}", tmp / "cache", p) for k in range(p["reruns"])]
    rerun = statistics.median(reruns)
    ratio = first / rerun
    print(f"tl-app extract, {p['images']} JPEGs ~500x375, {p['backbone']} at {p['size']} px, whole process: first "
          f"run {first:.1f}s, cached re-run {rerun:.2f}s (median of {', '.join(f'{r:.2f}' for r in reruns)}) = "
          f"{ratio:.1f}x faster (P2 target >= 20x and <= 1 s at 1,000 images, 224 px)", flush=True)
    emit("noop", {"mode": "quick" if args.quick else "full", "params": p, "first_s": round(first, 2),
                  "rerun_s": round(rerun, 3), "reruns_s": [round(r, 3) for r in reruns], "ratio": round(ratio, 1)},
         [target_row("P2", f"first run of tl-app extract / its cached re-run, whole process, {p['images']} images at "
                           f"{p['size']} px", first, "s", rerun, "the cached re-run of the same command, median of "
                     f"{p['reruns']}", first / rerun, ">= 20"),
          target_row("P2", "the same cached re-run, in seconds (an absolute goal)", rerun, "s", None, "none",
                     rerun, "<= 1")])


if __name__ == "__main__":
    main()
