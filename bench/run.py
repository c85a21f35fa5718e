"""Run every benchmark (bench/bench_*.py) and collect their JSON result lines.

    python bench/run.py [--quick] [--only NAME ...]
    python bench/run.py --table [--quick]      # the rows of the last recorded runs, without running

Each benchmark measures its own baseline in the same run and prints ratios;
results are appended to bench/results/results.jsonl. A benchmark that measures
an issue's target rows (issue 17's P1, P1b, P1c, P2, P7, P9) lists them under
"target_rows", and this script ends with one table of every row: the figure, the
baseline it was divided by, the ratio and the target.
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
    parser.add_argument("--table", action="store_true", help="print the rows of the last recorded runs and stop")
    args = parser.parse_args()
    out_dir = HERE / "results"
    if args.table:
        print_table(last_records(out_dir / "results.jsonl", args.quick, args.only))
        return 0
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    out_dir.mkdir(exist_ok=True)
    failed = 0
    records = []
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
            records.append(record)
            with open(out_dir / "results.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
    print_table(records)
    return 1 if failed else 0


def last_records(path: Path, quick: bool, only: list[str] | None) -> list[dict]:
    """The newest recorded run of each benchmark in the mode asked for."""
    newest: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("quick") == quick and (not only or record.get("bench") in only):
                newest[record["bench"]] = record
    return list(newest.values())


def print_table(records: list[dict]) -> None:
    """Every target row of these records, ordered by row name: figure, baseline, ratio, target, met."""
    rows = [dict(row, bench=record["bench"], time=record["time"]) for record in records
            for row in record.get("target_rows", [])]
    if not rows:
        return
    rows.sort(key=lambda row: row["row"])
    print("\n=== target rows (each ratio against a baseline measured in the same run)")
    print(f"{'row':<4} {'ratio':>8} {'target':>7} {'met':<3}  figure / baseline: what")
    for row in rows:
        baseline = "" if row["baseline"] is None else f" / {row['baseline']:g} {row['unit']} ({row['baseline_what']})"
        print(f"{row['row']:<4} {row['ratio']:>8.3f} {row['target']:>7} {'yes' if row['met'] else 'NO':<3}  "
              f"{row['value']:g} {row['unit']}{baseline}: {row['what']} [bench_{row['bench']}, {row['time']}]")


if __name__ == "__main__":
    sys.exit(main())
