"""tl-app patches keeps memory flat: peak RSS on 5,000 images against 500, measured in one run.

The pass keeps only a top-K heap per unit, so a folder ten times larger should
not need more memory (target: ratio <= 1.2). Each size runs in a fresh process
(the peak RSS of a process never goes down), on the same kind of images.

    python bench/bench_patches.py [--quick]

--quick: 32 px images, vgg16 up to block2_conv2 at 32 px (random weights); a few minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import emit

CHILD = """
import json, sys, time
from tl_app.insight.patches import patches
start = time.perf_counter()
summary = patches("vgg16", sys.argv[1], layer=sys.argv[2], input_size=int(sys.argv[3]), units=8, per_unit=16,
                  out=sys.argv[4], echo=None)
# this process's own high-water mark (ru_maxrss would carry the parent's across fork and exec)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"images": summary["images"], "seconds": time.perf_counter() - start,
                  "peak_rss_mib": int(hwm) / 1024}))
"""


def write_images(root: Path, count: int, size: int, seed: int) -> Path:
    """Two class folders of PNGs: noise with a bright rectangle somewhere (the heaps keep changing)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in range(count):
        pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size - size // 4, 2)
        pixels[y:y + size // 4, x:x + size // 4] = rng.integers(150, 256, 3, dtype=np.uint8)
        folder = root / f"class{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{n:05d}.png")
    return root


def measure(folder: Path, layer: str, size: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), layer, str(size), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="32 px images and a shallow layer")
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    args = parser.parse_args()
    size, layer = (32, "block2_conv2") if args.quick else (128, "block4_conv3")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        small = write_images(tmp / "small", args.small, size, seed=0)
        large = write_images(tmp / "large", args.large, size, seed=1)
        print(f"wrote {args.small} + {args.large} images of {size} px in {time.perf_counter() - start:.0f} s")
        results = {}
        for name, folder, count in (("small", small, args.small), ("large", large, args.large)):
            results[name] = measure(folder, layer, size, tmp / f"{name}.png")
            assert results[name]["images"] == count, results[name]
            print(f"{count:>6} images: peak RSS {results[name]['peak_rss_mib']:.0f} MiB, "
                  f"{results[name]['seconds']:.0f} s")
    ratio = results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"]
    print(f"peak RSS {args.large} / {args.small} images: {ratio:.3f} (target <= 1.2)")
    emit("patches", {"quick": args.quick, "image_size": size, "layer": layer, "small": results["small"],
                     "large": results["large"], "peak_rss_ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
