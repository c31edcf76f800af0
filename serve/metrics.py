"""The service's own Prometheus metrics, defined once here and recorded by the encoders and the ingress.

They are ``ray.serve.metrics`` objects, so Ray's metrics agent exports them (with Ray's ``ray_`` prefix)
next to Serve's built-in ones, and Serve adds the ``deployment``, ``replica`` and ``application`` tags.
:data:`METRICS` is the single list that the README, the Grafana dashboard and the tests read.

Recording never raises: a metrics problem must not fail a request.

A gauge is exported only while it is being set: Ray's exporters drop a gauge value that was not recorded again
within about two report intervals. So :class:`Metrics` keeps each gauge's last value and records it again every
:data:`GAUGE_REFRESH_S` from a daemon thread, so that a gauge set once (the start-up self-check's
``emotion_ray_internals_ok``, ``emotion_stream_open`` on a replica with no streams) stays on the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

PREFIX = "emotion_"
GAUGE_REFRESH_S = 4.0  # under Ray's default metrics report interval (10 s), so a held gauge never ages out
LATENCY_BOUNDARIES_MS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    20,
    30,
    50,
    80,
    100,
    150,
    200,
    300,
    500,
    800,
    1000,
    2000,
    5000,
    10000,
    30000,
)
BATCH_BOUNDARIES: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
RTF_BOUNDARIES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1, 1.5, 2, 3, 5, 10)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (with :data:`PREFIX`), kind, meaning, tag keys and histogram buckets."""

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "emotion_encoder_decode_ms",
        "histogram",
        "ffmpeg decode time of one input inside an encoder (text: validation) (ms)",
        ("modality",),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_encoder_model_ms",
        "histogram",
        "Batched model forward time seen by one input (ms)",
        ("modality",),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_encoder_latency_ms",
        "histogram",
        "End-to-end time of one input inside an encoder: decode, batch wait, forward (ms)",
        ("modality",),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_encoder_batch_size", "histogram", "Size of each batched forward", ("modality",), BATCH_BOUNDARIES
    ),
    MetricSpec(
        "emotion_transcribe_latency_ms",
        "histogram",
        "End-to-end time of one transcript inside the Transcriber: decode and transcription (ms)",
        (),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_transcribe_rtf",
        "histogram",
        "Real-time factor of one transcript: transcription time over the audio's duration (below 1: faster "
        "than real time)",
        (),
        RTF_BOUNDARIES,
    ),
    MetricSpec(
        "emotion_requests_total", "counter", "HTTP requests by endpoint and status code", ("endpoint", "status")
    ),
    MetricSpec(
        "emotion_request_latency_ms",
        "histogram",
        "HTTP request latency at the ingress (ms)",
        ("endpoint",),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_predictions_total",
        "counter",
        "Predictions by emotion and modality (modality 'fused' is the top-level answer)",
        ("emotion", "modality"),
    ),
    MetricSpec(
        "emotion_dropped_modalities_total",
        "counter",
        "Modalities dropped from a request, by reason code",
        ("modality", "reason"),
    ),
    MetricSpec(
        "emotion_access_decisions_total",
        "counter",
        "Prediction requests by access decision (allowed, unauthorized, rate_limited, too_many_uploads) and "
        "client (a key id such as key-1a2b3c4d, never the key; 'anonymous' without a valid key)",
        ("decision", "client"),
    ),
    MetricSpec("emotion_stream_open", "gauge", "Live streams (/ws/stream) open on this ingress replica", ()),
    MetricSpec(
        "emotion_stream_updates_total",
        "counter",
        "Live-stream updates pushed, by outcome (update: a prediction; error: no modality of the window could be used)",
        ("outcome",),
    ),
    MetricSpec(
        "emotion_stream_update_latency_ms",
        "histogram",
        "Live-stream update latency from the window snapshot: per modality its encoder's answer, 'fused' "
        "the whole update (ms)",
        ("modality",),
        LATENCY_BOUNDARIES_MS,
    ),
    MetricSpec(
        "emotion_stream_closes_total",
        "counter",
        "Live streams closed by the server, by reason (bad_frame, too_big, idle, unauthorized, busy, ...) "
        "or 'client' when the client closed",
        ("reason",),
    ),
    MetricSpec(
        "emotion_ray_internals_ok",
        "gauge",
        "1 when this ingress replica's start-up check could read the encoders' replica counts from Ray Serve's "
        "router (serve/replicas.py); 0 when it fell back to retries and timeouts only",
        (),
    ),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
SPECS: dict[str, MetricSpec] = {m.name: m for m in METRICS}
assert all(name.startswith(PREFIX) for name in METRIC_NAMES)


class Metrics:
    """Lazily created ``ray.serve.metrics`` objects (create inside the replica that records them)."""

    def __init__(self, refresh_s: float = GAUGE_REFRESH_S) -> None:
        self._objects: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._refresh_s = refresh_s
        self._refresher: threading.Thread | None = None

    def _get(self, name: str) -> Any:
        metric = self._objects.get(name)
        if metric is None:
            from ray.serve import metrics as serve_metrics

            spec = SPECS[name]
            if spec.kind == "counter":
                metric = serve_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            else:
                metric = serve_metrics.Histogram(
                    spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
                )
            self._objects[name] = metric
        return metric

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record a histogram value."""
        try:
            self._get(name).observe(float(value), tags=dict(tags))
        except Exception:  # metrics are best effort
            logger.debug("could not record %s", name, exc_info=True)

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set a gauge; its value is recorded again every ``refresh_s`` until the next ``set``."""
        with self._lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = float(value)
            if self._refresher is None and self._refresh_s > 0:
                self._refresher = threading.Thread(target=self._refresh_forever, name="gauge-refresh", daemon=True)
                self._refresher.start()
        self._record_gauge(name, float(value), dict(tags))

    def held_gauges(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The gauges being kept alive: ``(name, sorted tags) -> last value``."""
        with self._lock:
            return dict(self._gauges)

    def refresh(self) -> None:
        """Record every held gauge's last value again."""
        for (name, tags), value in self.held_gauges().items():
            self._record_gauge(name, value, dict(tags))

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            self.refresh()

    def _record_gauge(self, name: str, value: float, tags: dict[str, str]) -> None:
        try:
            self._get(name).set(value, tags=tags)
        except Exception:  # metrics are best effort
            logger.debug("could not record %s", name, exc_info=True)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Increment a counter."""
        try:
            self._get(name).inc(value, tags=dict(tags))
        except Exception:  # metrics are best effort
            logger.debug("could not record %s", name, exc_info=True)
