"""What `GET /metrics` shows, in Prometheus' text format: one `CollectorRegistry` per app (never the
process-wide one), so several apps in one process, and tests, keep their own counts.

- `vitkit_requests_total{endpoint, task, status}`: answered requests; `task` is a served task's name
  or "" (a request that names none or an unknown one), `endpoint` a route of the app or "other";
- `vitkit_request_seconds{endpoint}`: latency, from the request's arrival to its answer;
- `vitkit_requests_in_flight`: requests being answered now;
- `vitkit_batch_size{task, kind}` and `vitkit_queue_seconds{task, kind}`: the batcher's batches (images
  per batch) and how long each image waited in its queue before its batch ran; `kind` is "predict"
  (`/predict`) or "embed" (`/v1/embeddings`, one queue entry per input image).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The counters, gauge and histograms of one app, in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vitkit_requests",
            "Requests answered, by endpoint, task and HTTP status",
            ("endpoint", "task", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "vitkit_request_seconds", "Time to answer a request", ("endpoint",), registry=self.registry
        )
        self.in_flight = Gauge("vitkit_requests_in_flight", "Requests being answered", registry=self.registry)
        self.batch_size = Histogram(
            "vitkit_batch_size",
            "Images per batch",
            ("task", "kind"),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "vitkit_queue_seconds",
            "Time an image waited in its queue (task and kind) before its batch ran",
            ("task", "kind"),
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, task: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, task, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, key: tuple[str, str], queue_seconds: list[float]) -> None:
        """A batch of `len(queue_seconds)` images of key (kind, task) starts; each waited that long."""
        kind, task = key
        self.batch_size.labels(task, kind).observe(len(queue_seconds))
        waited = self.queue_seconds.labels(task, kind)
        for seconds in queue_seconds:
            waited.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
