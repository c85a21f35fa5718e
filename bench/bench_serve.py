"""`tl-app serve` under load: requests/s and p50/p99 latency at concurrency 1, 4 and 16,
dynamic batching on vs off, in one run. Target: at concurrency 16, batching reaches >= 90% of the
model's own batch gain (measured in the same run), with p99 no worse than without batching.

Each request is a TF Serving row-format :predict with one b64 JPEG. The two
servers (batching on, off) run in subprocesses, as users run them; the load
comes from closed-loop client threads with keep-alive connections in this
process, alternating between the servers in short slices.

    python bench/bench_serve.py [--quick] [--backbone resnet50] [--size 64] [--photo-size 500x375] [--seconds S]

Both modes pay the same per-image decode and antialiased resize inside the
graph; the script also prints the model-alone ceiling (per-image time at batch
1 over batch 16, in-process), the most batching can gain on the machine.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_predict import build_export
from common import emit, write_photo_folder

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, batching: bool, max_batch: int, timeout_ms: float, log: Path, allowed: str = ""):
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    log_handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tl_app", "serve", str(root), "--port", str(port),
                             "--batching" if batching else "--no-batching", "--max-batch-size", str(max_batch),
                             "--batch-timeout-ms", str(timeout_ms), "--grpc-port", "0",
                             *(["--allowed-batch-sizes", allowed] if allowed else [])],
                            cwd=REPO, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
    log_handle.close()  # the child has its own copy
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def load(port: int, body: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    """`concurrency` closed-loop clients for `seconds` (after `warmup`): rate, p50, p99, errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds
    headers = {"Content-Type": "application/json"}

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine, bad = [], 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                conn.request("POST", "/v1/models/bench:predict", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            t1 = time.perf_counter()
            if t0 >= start_at and t1 <= stop_at:
                if ok:
                    mine.append(t1 - t0)
                else:
                    bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors[0], "seconds": seconds}


def summarise(concurrency: int, slices: list[dict], images: float, calls: float) -> dict:
    lat = np.array([x for s in slices for x in s["latencies"]]) * 1000
    seconds = sum(s["seconds"] for s in slices)
    return {"concurrency": concurrency, "requests": len(lat), "errors": sum(s["errors"] for s in slices),
            "requests_per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "images_per_call": round(images / max(calls, 1), 2)}


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def stage_means(port: int) -> dict:
    """Mean milliseconds per stage (tlapp_stage_seconds: decode, queue, handoff, model, encode) over the run."""
    sums, counts = {}, {}
    for line in metrics_text(port).splitlines():
        for part, into in (("_sum{", sums), ("_count{", counts)):
            if line.startswith("tlapp_stage_seconds" + part):
                stage = line.split('stage="')[1].split('"')[0]
                into[stage] = into.get(stage, 0.0) + float(line.split()[-1])
    return {stage: round(1000 * sums[stage] / counts[stage], 2) for stage in sums if counts.get(stage)}


def batch_totals(port: int) -> tuple[float, float]:
    """(images, model calls) so far, from the server's /metrics."""
    text = metrics_text(port)
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("tlapp_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("tlapp_batch_size_count"):
            count += float(line.split()[-1])
    return total, count


def model_ceiling(version: Path, photo: bytes, batch: int) -> float:
    """Per-image time of the serving signature at batch 1 / at `batch`: what batching can gain at most."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(version)).signatures["serving_default"]

    def per_image(n: int) -> float:
        x = tf.constant([photo] * n)
        signature(image_bytes=x)
        runs = max(3, 32 // n)
        start = time.perf_counter()
        for _ in range(runs):
            signature(image_bytes=x)
        return (time.perf_counter() - start) / (runs * n)

    return per_image(1) / per_image(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--photo-size", default="500x375", help="WxH of the JPEG each request carries")
    parser.add_argument("--allowed-batch-sizes", default="",
                        help="the batching server pads to these (e.g. 1,2,4,8,16,32); default: no padding")
    args = parser.parse_args()
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    warmup = 0.5 if args.quick else 1.0
    rounds = 2 if args.quick else 3
    levels = (1, 4, 16)

    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, version = build_export(tmp, args.backbone, args.size)
        width, height = (int(v) for v in args.photo_size.lower().split("x"))
        photo = next(write_photo_folder(tmp / "photos", 1, size=(width, height)).rglob("*.jpg"))
        ceiling = model_ceiling(version, photo.read_bytes(), min(16, args.max_batch_size))
        body = json.dumps({"instances": [{"b64": base64.b64encode(photo.read_bytes()).decode()}]}).encode()
        servers = {}
        try:  # both servers up at once; their slices alternate, so a noisy neighbour hits both alike
            for mode, batching in (("batching", True), ("no-batching", False)):
                servers[mode] = start_server(tmp / "saved_models", batching, args.max_batch_size,
                                             args.batch_timeout_ms, tmp / f"{mode}.log",
                                             args.allowed_batch_sizes if batching else "")
                load(servers[mode][1], body, 16, 1.0, 0.0)  # trace every batch size path once
            for mode in servers:
                results[mode] = []
            for concurrency in levels:
                slices = {mode: [] for mode in servers}
                counts = {mode: [0.0, 0.0] for mode in servers}
                for _ in range(rounds):
                    for mode, (_, port) in servers.items():
                        images0, calls0 = batch_totals(port)
                        slices[mode].append(load(port, body, concurrency, seconds / rounds, warmup))
                        images1, calls1 = batch_totals(port)
                        counts[mode][0] += images1 - images0
                        counts[mode][1] += calls1 - calls0
                for mode in servers:
                    results[mode].append(summarise(concurrency, slices[mode], *counts[mode]))
            stages = {mode: stage_means(port) for mode, (_, port) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    print(f"tl-app serve: {args.backbone} {args.size}x{args.size}, 1 JPEG ({args.photo_size}) per request, "
          f"{seconds:g}s per level and mode in {rounds} alternating slices, max batch {args.max_batch_size}, "
          f"timeout {args.batch_timeout_ms:g} ms"
          + (f", allowed batch sizes {args.allowed_batch_sizes}" if args.allowed_batch_sizes else ""))
    print(f"{'mode':<12} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'img/call':>8}")
    for mode, rows in results.items():
        for row in rows:
            print(f"{mode:<12} {row['concurrency']:>4} {row['requests_per_s']:>8.1f} {row['p50_ms']:>8} "
                  f"{row['p99_ms']:>8} {row['errors']:>6} {row['images_per_call']:>8}")
    ratios = {c: results["batching"][i]["requests_per_s"] / max(results["no-batching"][i]["requests_per_s"], 1e-9)
              for i, c in enumerate(levels)}
    print("throughput ratio batching on / off: " + ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios.items()))
    print(f"model alone (in-process, no HTTP): per-image time at batch 1 / at batch {min(16, args.max_batch_size)}"
          f" = {ceiling:.2f}x (how much batching can save on this machine)")
    share = ratios[16] / ceiling
    p99_on, p99_off = results["batching"][-1]["p99_ms"], results["no-batching"][-1]["p99_ms"]
    print(f"batching at c=16 reaches {ratios[16]:.2f} / {ceiling:.2f} = {share:.0%} of the model's own batch gain "
          f"(target >= 90%); p99 at c=16: {p99_on} ms batching vs {p99_off} ms without "
          f"(ratio {p99_on / max(p99_off or 1e-9, 1e-9):.2f}, target <= 1)")
    for mode, means in stages.items():
        print(f"where the time goes ({mode}, mean ms over the run; decode, queue, encode per request, "
              f"handoff and model per call): " + ", ".join(f"{k} {v}" for k, v in means.items()))
    emit("serve", {"backbone": args.backbone, "size": args.size, "photo_size": args.photo_size,
                   "seconds_per_level": seconds,
                   "results": results, "ratio_c16": round(ratios[16], 2),
                   "ratios": {str(c): round(r, 2) for c, r in ratios.items()},
                   "p99_ms_c16_batching": results["batching"][-1]["p99_ms"],
                   "model_batch_ceiling": round(ceiling, 2), "share_of_model_gain_c16": round(share, 3),
                   "p99_ratio_c16": round(p99_on / max(p99_off or 1e-9, 1e-9), 2), "stage_ms": stages,
                   "allowed_batch_sizes": args.allowed_batch_sizes})


if __name__ == "__main__":
    main()
