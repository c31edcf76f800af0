"""Pure result maths: percentiles, latency summaries, composite ceilings and ratios (no I/O, no timing)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` with linear interpolation (numpy's default method).

    Returns NaN for an empty sequence.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class LoadResult:
    """What one load cell (one target, one endpoint, one concurrency) measured.

    ``latencies_ms`` holds the latency of every successful request; ``elapsed_s`` is the wall time
    from the first request sent to the last answer received (warm-up excluded).
    """

    target: str
    endpoint: str
    concurrency: int
    latencies_ms: list[float]
    errors: int
    elapsed_s: float
    status_counts: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        """Successful requests per second (0 when nothing succeeded)."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 and self.ok else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: counts, throughput and latency percentiles (no raw latencies)."""
        lat = self.latencies_ms
        return {
            "target": self.target,
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "requests_ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 4),
            "throughput_rps": round(self.throughput, 3),
            "p50_ms": _r(percentile(lat, 50)),
            "p95_ms": _r(percentile(lat, 95)),
            "p99_ms": _r(percentile(lat, 99)),
            "mean_ms": _r(sum(lat) / len(lat)) if lat else None,
            "max_ms": _r(max(lat)) if lat else None,
            "status_counts": dict(self.status_counts),
            "error_samples": list(self.error_samples[:5]),
            **self.extra,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, raw latencies included (for re-analysis)."""
        return asdict(self)


def _r(value: float | None, digits: int = 3) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def composite_ceiling(per_modality: Mapping[str, float], modalities: Iterable[str]) -> float | None:
    """Ceiling (items/s) of a request that needs one item of each of ``modalities``, done one after another.

    ``per_modality`` maps a modality to its best in-process throughput (items/s); the time per
    request is the sum of the per-item times. Returns None if a needed modality was not measured.
    """
    total = 0.0
    needed = list(modalities)
    if not needed:
        return None
    for name in needed:
        thr = per_modality.get(name)
        if not thr or thr <= 0:
            return None
        total += 1.0 / thr
    return 1.0 / total


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 digits, or None when either is missing or zero."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def best_ceiling(rows: Iterable[Mapping[str, Any]], modality: str, key: str = "e2e_items_per_s") -> float | None:
    """Highest ``key`` throughput over the batch sizes measured for ``modality`` in ceiling rows."""
    values = [float(r[key]) for r in rows if r.get("modality") == modality and r.get(key)]
    return max(values) if values else None
