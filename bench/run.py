"""Run every benchmark (bench/bench_*.py) and collect their JSON result lines.

    python bench/run.py [--quick] [--only NAME ...]

Each benchmark measures its own baseline in the same run and prints ratios;
results are appended to bench/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="bench names, e.g. backbone extract")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed = 0
    for script in scripts:
        print(f"=== {script.stem}", flush=True)
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            failed += 1
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if last:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick, **json.loads(last[-1])}
            with open(out_dir / "results.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
