"""Prometheus text-format metrics, kept in-process (no client library needed).

Labels are route templates and model names the registry knows, never raw
request paths, so a client cannot grow the label set without bound.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(pairs: tuple) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Counters and histograms behind one lock; ``render()`` gives the /metrics body."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[tuple, Histogram] = {}
        self.batches: dict[tuple, Histogram] = {}
        self.images: dict[tuple, int] = defaultdict(int)
        self.in_flight = 0
        self.gauges: dict[str, callable] = {}
        self.stages: dict[tuple, Histogram] = {}  # where a request's time goes: decode, queue, handoff, model
        self.padding: dict[tuple, int] = defaultdict(int)

    def stage(self, model: str, stage: str, value: float) -> None:
        """Seconds one request (queue, decode) or batch (handoff, model) spent in a stage; 'padding' counts rows."""
        with self.lock:
            if stage == "padding":
                self.padding[(("model", model),)] += int(value)
                return
            key = (("model", model), ("stage", stage))
            if key not in self.stages:
                self.stages[key] = Histogram(LATENCY_BUCKETS)
            self.stages[key].observe(value)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(("method", method), ("route", route), ("status", str(status)))] += 1
            key = (("route", route),)
            if key not in self.latency:
                self.latency[key] = Histogram(LATENCY_BUCKETS)
            self.latency[key].observe(seconds)

    def batch(self, model: str, signature: str, size: int) -> None:
        with self.lock:
            key = (("model", model), ("signature", signature))
            if key not in self.batches:
                self.batches[key] = Histogram(BATCH_BUCKETS)
            self.batches[key].observe(size)
            self.images[key] += size

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            lines += ["# HELP tlapp_http_requests_total HTTP requests by method, route and status.",
                      "# TYPE tlapp_http_requests_total counter"]
            lines += [f"tlapp_http_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            lines += ["# HELP tlapp_http_request_duration_seconds Request latency by route.",
                      "# TYPE tlapp_http_request_duration_seconds histogram"]
            for key, hist in sorted(self.latency.items()):
                lines += _histogram("tlapp_http_request_duration_seconds", key, hist)
            lines += ["# HELP tlapp_batch_size Images per model call (dynamic batching).",
                      "# TYPE tlapp_batch_size histogram"]
            for key, hist in sorted(self.batches.items()):
                lines += _histogram("tlapp_batch_size", key, hist)
            lines += ["# HELP tlapp_images_total Images classified.", "# TYPE tlapp_images_total counter"]
            lines += [f"tlapp_images_total{_labels(k)} {v}" for k, v in sorted(self.images.items())]
            lines += ["# HELP tlapp_stage_seconds Where serving time goes: decode and queue (per request), "
                      "handoff to a worker thread and model (per model call).",
                      "# TYPE tlapp_stage_seconds histogram"]
            for key, hist in sorted(self.stages.items()):
                lines += _histogram("tlapp_stage_seconds", key, hist)
            lines += ["# HELP tlapp_batch_padding_images_total Rows added to pad batches to allowed sizes.",
                      "# TYPE tlapp_batch_padding_images_total counter"]
            lines += [f"tlapp_batch_padding_images_total{_labels(k)} {v}" for k, v in sorted(self.padding.items())]
            lines += ["# HELP tlapp_in_flight_requests Requests being handled now.",
                      "# TYPE tlapp_in_flight_requests gauge", f"tlapp_in_flight_requests {self.in_flight}"]
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {read()}"]
        return "\n".join(lines) + "\n"


def _histogram(name: str, key: tuple, hist: Histogram) -> list[str]:
    out = []
    for bound, count in zip(hist.buckets, hist.counts):
        out.append(f"{name}_bucket{_labels(key + (('le', _number(bound)),))} {count}")
    out.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.total}")
    out.append(f"{name}_sum{_labels(key)} {hist.sum:.6f}")
    out.append(f"{name}_count{_labels(key)} {hist.total}")
    return out


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() and value >= 1 else repr(float(value))
