"""`tl-app predict` (files -> decode -> resize -> SavedModel, streamed through tf.data) vs raw
`model.predict` on in-memory tensors, same model, same run. Target: ratio >= 0.9.

Wall-clock figures on a shared machine swing with the neighbours' load, so the
two sides are measured in interleaved pairs (median pair reported), and the
ratio of process CPU time per image is printed too (the pipeline's decode and
resize are extra work; CPU time shows how much).

    python bench/bench_predict.py [--quick] [--backbone resnet50] [--size 224] [--images N] [--resume-only]
                                  [--runtime-only]

Then `--resume` (issue 17): the real command, whole process, over the same
folder twice: the first run, and `--resume` once every row is in the file
(median of three), reported as resumed / first.

P9 (issue 17): the real command, whole process, over the same files with
`--runtime onnxruntime` and `--runtime tflite` (each converted and checked once
before, not timed) and with the Keras runtime (the SavedModel), in interleaved
pairs: images/s of the fast runtime / Keras (median pair), whole process and the
command's own images/s.
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

import numpy as np
from common import emit, target_row, write_photo_folder


def build_export(tmp: Path, backbone: str, size: int) -> tuple[Path, Path]:
    """A real run directory and its SavedModel export (random weights: speed does not depend on them)."""
    from tl_app.models.backbones import build_feature_model
    from tl_app.core.config import Config
    from tl_app.export.exporter import export_run
    from tl_app.models.surgery import assemble
    from tl_app.models.heads import build_head
    from tl_app.models.artifacts import MODEL_FILE
    from tl_app.training.runs import write_run_info
    from tl_app.data.sample import write_sample_dataset
    from tl_app.training.runs import prepare_run

    write_sample_dataset(tmp / "sample", seed=0, counts={"circles": 4, "squares": 4, "triangles": 4})
    config = Config()
    config.data.root = str(tmp / "sample")
    config.backbone.name = backbone
    config.backbone.weights = "none"
    config.backbone.input_size = size
    config.features.cache_dir = str(tmp / "cache" / "features")
    config.train.runs_dir = str(tmp / "runs")
    config.train.name = "bench"
    prepared = prepare_run(config, echo=None)
    features = build_feature_model(prepared.spec, size, "none", 0, "", "avg")
    model = assemble(features, build_head(3, int(features.output.shape[-1]), config.head))
    model.save(prepared.run_dir / MODEL_FILE)
    write_run_info(prepared.run_dir, metrics={})
    result = export_run(prepared.run_dir, root=tmp / "saved_models", name="bench", formats="savedmodel,keras",
                        echo=None)
    return prepared.run_dir, result["path"]


HERE = Path(__file__).resolve().parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # bytecode kept, as users run it


def run_predict(version: Path, photos: Path, out: Path, batch_size: int, *extra: str) -> tuple[float, str]:
    """(wall seconds, stderr) of `tl-app predict` in a fresh process."""
    command = [sys.executable, "-m", "tl_app", "predict", str(version), str(photos), "--out", str(out), "--quiet",
               "--batch-size", str(batch_size), *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return seconds, proc.stderr


def resume_figure(version: Path, photos: Path, tmp: Path, count: int, batch_size: int) -> dict:
    """First whole-process run vs `--resume` with every row already in the file."""
    out = tmp / "resume.csv"
    first, _ = run_predict(version, photos, out, batch_size)
    rows = out.read_bytes()
    resumed = []
    for _ in range(3):
        seconds, said = run_predict(version, photos, out, batch_size, "--resume")
        assert f"skipped {count} already in it" in said, said[-2000:]
        resumed.append(seconds)
    assert out.read_bytes() == rows  # nothing was left to predict: the file is unchanged
    median = statistics.median(resumed)
    print(f"tl-app predict --resume, {count} JPEGs, every row already done, whole process: first run {first:.1f}s, "
          f"resumed {median:.2f}s (median of {', '.join(f'{r:.2f}' for r in resumed)}) = {median / first:.2f} of "
          f"the first run ({first / median:.1f}x faster)", flush=True)
    return {"first_s": round(first, 2), "resumed_s": round(median, 3), "resumed_runs_s": [round(r, 3) for r in resumed],
            "resume_ratio": round(median / first, 3)}


def said_rate(stderr: str) -> float:
    """The command's own images/s (its summary line: model calls and I/O, no process start)."""
    import re

    found = re.search(r"\(([0-9.]+) images/s\)", stderr)
    return float(found.group(1)) if found else float("nan")


def runtime_figure(version: Path, photos: Path, tmp: Path, count: int, batch_size: int, rounds: int,
                   runtimes=("onnxruntime", "tflite")) -> dict:
    """P9: `tl-app predict --runtime R` vs the Keras runtime, whole process, same files, for each fast R."""
    out = {}
    for runtime in runtimes:
        convert_s, _ = run_predict(version, photos, tmp / f"convert-{runtime}.csv", batch_size, "--runtime", runtime)
        pairs = []
        for _ in range(rounds):  # interleaved: a neighbour's load hits both sides of a pair alike
            keras_s, keras_said = run_predict(version, photos, tmp / "keras.csv", batch_size)
            fast_s, fast_said = run_predict(version, photos, tmp / f"{runtime}.csv", batch_size, "--runtime", runtime)
            pairs.append({"keras_s": keras_s, "fast_s": fast_s, "keras_rate": said_rate(keras_said),
                          "fast_rate": said_rate(fast_said)})
        whole = sorted(p["keras_s"] / p["fast_s"] for p in pairs)
        steady = sorted(p["fast_rate"] / p["keras_rate"] for p in pairs)
        keras_rows = (tmp / "keras.csv").read_text().splitlines()
        fast_rows = (tmp / f"{runtime}.csv").read_text().splitlines()
        same_labels = sum(a.split(",")[1] == b.split(",")[1] for a, b in zip(keras_rows[1:], fast_rows[1:]))
        x = {"ratio_whole_process": round(whole[len(whole) // 2], 3), "pair_ratios_whole": [round(r, 3) for r in whole],
             "ratio_command": round(steady[len(steady) // 2], 3),
             "pair_ratios_command": [round(r, 3) for r in steady],
             "keras_s": [round(p["keras_s"], 2) for p in pairs], "fast_s": [round(p["fast_s"], 2) for p in pairs],
             "first_run_with_conversion_s": round(convert_s, 2), "top1_equal": same_labels,
             "rows": len(keras_rows) - 1}
        out[runtime] = x
        print(f"P9 tl-app predict --runtime {runtime} / Keras runtime (SavedModel), {count} JPEGs, whole process: "
              f"{x['ratio_whole_process']:.2f}x images/s (median of {rounds} interleaved pairs: "
              f"{', '.join(f'{r:.2f}' for r in whole)}; keras {', '.join(f'{v:.1f}s' for v in x['keras_s'])}, "
              f"{runtime} {', '.join(f'{v:.1f}s' for v in x['fast_s'])}); the command's own images/s "
              f"{x['ratio_command']:.2f}x (pairs {', '.join(f'{r:.2f}' for r in steady)}); target >= 1.2x; first "
              f"{runtime} run incl. conversion and parity check {convert_s:.1f}s; top-1 equal in "
              f"{same_labels}/{x['rows']} rows", flush=True)
    return out


def p9_row(runtimes: dict, count: int, backbone: str, size: int) -> list[dict]:
    """Issue 17's P9: images/s of `predict --runtime R` over Keras `predict` on the same files, per runtime."""
    rows = []
    for name, x in runtimes.items():
        keras_s, fast_s = statistics.median(x["keras_s"]), statistics.median(x["fast_s"])
        rows.append(target_row("P9", f"tl-app predict --runtime {name}, whole process, {count} JPEGs, {backbone} "
                                     f"at {size} px", count / fast_s, "img/s", count / keras_s,
                               "tl-app predict with the Keras runtime (SavedModel) on the same files, interleaved "
                               "pairs", x["ratio_whole_process"], ">= 1.2"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resume-only", action="store_true", help="Only the --resume figure.")
    parser.add_argument("--runtime-only", action="store_true", help="Only the P9 --runtime figure.")
    args = parser.parse_args()
    from tl_app.models.opener import open_model
    from tl_app.inference import predict_paths
    from tl_app.models.opener import load_run_model

    count = args.images or (64 if args.quick else 320)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir, version = build_export(tmp, args.backbone, args.size)
        photos = write_photo_folder(tmp / "photos", count)
        runtime = runtime_figure(version, photos, tmp, count, args.batch_size, args.rounds)
        if args.runtime_only:
            emit("predict_runtime", {"images": count, "backbone": args.backbone, "size": args.size, **runtime},
                 p9_row(runtime, count, args.backbone, args.size))
            return
        resume = resume_figure(version, photos, tmp, count, args.batch_size)
        if args.resume_only:
            emit("predict_resume", {"images": count, "backbone": args.backbone, "size": args.size, **resume})
            return
        predictor = open_model(version)
        predict_paths(predictor, sorted(photos.rglob("*.jpg"))[: args.batch_size], out=tmp / "warm.csv",
                      batch_size=args.batch_size, echo=None)  # traces the pipeline and the signature
        model = load_run_model(run_dir)
        x = np.random.default_rng(0).uniform(0, 255, (count, args.size, args.size, 3)).astype("float32")
        model.predict(x[: args.batch_size], batch_size=args.batch_size, verbose=0)
        predict_runs, raw_runs, predict_cpu, raw_cpu = [], [], [], []
        for _ in range(args.rounds):  # interleaved pairs: a neighbour's load hits both sides of a pair alike
            start, cpu = time.perf_counter(), time.process_time()
            summary = predict_paths(predictor, [photos], out=tmp / "preds.csv", batch_size=args.batch_size,
                                    echo=None)
            predict_runs.append(summary["predicted"] / (time.perf_counter() - start))
            predict_cpu.append(time.process_time() - cpu)
            assert summary["predicted"] == count and summary["bad"] == 0
            start, cpu = time.perf_counter(), time.process_time()
            model.predict(x, batch_size=args.batch_size, verbose=0)
            raw_runs.append(count / (time.perf_counter() - start))
            raw_cpu.append(time.process_time() - cpu)
        ratios = sorted(p / r for p, r in zip(predict_runs, raw_runs))
        ratio = ratios[len(ratios) // 2]  # the median pair
        predict_ips, raw_ips = float(np.median(predict_runs)), float(np.median(raw_runs))
        cpu_ratio = float(np.median(raw_cpu)) / float(np.median(predict_cpu))  # CPU-seconds per image, inverted

    print(f"tl-app predict: {predict_ips:7.1f} images/s ({count} JPEGs ~500x375 from disk -> {args.size}, "
          f"{args.backbone} SavedModel, batch {args.batch_size}, CSV out)")
    print(f"model.predict:  {raw_ips:7.1f} images/s (in-memory {args.size}x{args.size} tensors, same model)")
    print(f"ratio predict / model.predict: {ratio:.2f} (median of {args.rounds} interleaved pairs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9)")
    print(f"CPU-time ratio (model.predict CPU-s / predict CPU-s, insensitive to other processes): {cpu_ratio:.2f}")
    emit("predict", {"images": count, "rounds": args.rounds, "backbone": args.backbone, "size": args.size,
                     "predict_images_per_s": round(predict_ips, 2), "model_predict_images_per_s": round(raw_ips, 2),
                     "ratio": round(ratio, 3),
                     "pair_ratios": [round(r, 3) for r in ratios], "cpu_time_ratio": round(cpu_ratio, 3),
                     "resume": resume, "runtime": runtime}, p9_row(runtime, count, args.backbone, args.size))


if __name__ == "__main__":
    main()
