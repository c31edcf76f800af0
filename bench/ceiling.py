"""The ceiling: in-process batched throughput of each encoder, straight through ``models/inference.py``.

Two numbers per encoder and batch size (1, 8, 32 by default):

* ``forward``: ``pipeline.encode(batch)`` on already prepared items (the model forward, plus the
  tokenisation for text, which ``TextPipeline.encode`` does batched);
* ``e2e`` (decode + forward): ``pipeline.prepare`` of every payload of the batch (ffmpeg decode and
  preprocessing, spread over a thread pool as wide as the machine's cores, as a server would), then
  one batched ``pipeline.encode``.

Nothing here knows about HTTP or Ray; it is the limit a server built on these pipelines can approach.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from bench.inputs import TEXTS, MediaInputs
from models.inference import AudioPipeline, FusionPipeline, Prepared, TextPipeline, VideoPipeline
from models.labels import MODALITIES

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[int], Any], min_time_s: float, min_reps: int, max_reps: int, warmup: int = 3
) -> list[float]:
    """Call ``fn(i)`` ``warmup`` times untimed, then until ``min_time_s`` has passed and ``min_reps`` are done.

    Returns the duration of each timed call in seconds (at most ``max_reps`` calls).
    """
    for i in range(warmup):
        fn(i)
    durations: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(durations) < max_reps and (len(durations) < min_reps or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn(warmup + i)
        durations.append(time.perf_counter() - t0)
        i += 1
    return durations


def _payloads(modality: str, media: MediaInputs, n: int, offset: int) -> list[Any]:
    if modality == "text":
        return [TEXTS[(offset + k) % len(TEXTS)] for k in range(n)]
    return [media.audio if modality == "audio" else media.video] * n


def measure_encoder(
    modality: str,
    pipeline: TextPipeline | AudioPipeline | VideoPipeline,
    media: MediaInputs,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_time_s: float = 2.0,
    min_reps: int = 3,
    max_reps: int = 1000,
    device: str = "cpu",
    prepare_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Forward-only and decode+forward throughput of one encoder at each batch size."""
    rows = []
    pool = ThreadPoolExecutor(max_workers=prepare_workers or os.cpu_count() or 1)
    prepared_one = {"audio": None, "video": None}
    for bs in batch_sizes:
        if modality == "text":

            def forward_batch(i: int, bs: int = bs) -> None:
                pipeline.encode([pipeline.prepare(t) for t in _payloads("text", media, bs, i * bs)])
                _sync(device)
        else:
            if prepared_one[modality] is None:
                prepared_one[modality] = pipeline.prepare(_payloads(modality, media, 1, 0)[0])
            items: list[Prepared] = [prepared_one[modality]] * bs

            def forward_batch(i: int, items: list[Prepared] = items) -> None:
                pipeline.encode(items)
                _sync(device)

        def e2e_batch(i: int, bs: int = bs) -> None:
            pipeline.encode(list(pool.map(pipeline.prepare, _payloads(modality, media, bs, i * bs))))
            _sync(device)

        fwd = time_calls(forward_batch, min_time_s, min_reps, max_reps)
        e2e = time_calls(e2e_batch, min_time_s, min_reps, max_reps) if modality != "text" else fwd
        prep_ms = None
        if modality != "text":
            prep = time_calls(lambda i: pipeline.prepare(_payloads(modality, media, 1, i)[0]), 0.0, 3, 3, warmup=0)
            prep_ms = round(statistics.median(prep) * 1000.0, 3)
        rows.append(
            {
                "modality": modality,
                "batch_size": bs,
                "forward_ms_per_batch": round(statistics.median(fwd) * 1000.0, 3),
                "forward_items_per_s": round(bs * len(fwd) / sum(fwd), 3),
                "forward_reps": len(fwd),
                "e2e_ms_per_batch": round(statistics.median(e2e) * 1000.0, 3),
                "e2e_items_per_s": round(bs * len(e2e) / sum(e2e), 3),
                "e2e_reps": len(e2e),
                "prepare_ms_per_item": prep_ms,
            }
        )
    pool.shutdown()
    return rows


def measure_fusion(device: str = "cpu", min_time_s: float = 1.0) -> dict[str, Any]:
    """Time of ``FusionPipeline.fuse`` on three random embeddings and probabilities (one request's fusion)."""
    fusion = FusionPipeline(device=device)
    rng = np.random.default_rng(0)
    emb = {m: rng.standard_normal(256).astype(np.float32) for m in fusion.modalities}
    probs = {m: rng.dirichlet(np.ones(7)).astype(np.float32) for m in fusion.modalities}
    durations = time_calls(lambda i: fusion.fuse(emb, probs), min_time_s, 10, 10000, warmup=3)
    med = statistics.median(durations)
    return {
        "modality": "fusion",
        "batch_size": 1,
        "forward_ms_per_batch": round(med * 1000.0, 4),
        "forward_items_per_s": round(len(durations) / sum(durations), 3),
        "forward_reps": len(durations),
        "e2e_ms_per_batch": round(med * 1000.0, 4),
        "e2e_items_per_s": round(len(durations) / sum(durations), 3),
        "e2e_reps": len(durations),
        "prepare_ms_per_item": None,
    }


def measure_ceiling(
    media: MediaInputs,
    modalities: Sequence[str] = MODALITIES,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_time_s: float = 2.0,
    min_reps: int = 3,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every requested encoder (and the fusion module); models are freed afterwards."""
    builders = {"text": TextPipeline, "audio": AudioPipeline, "video": VideoPipeline}
    rows: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    for modality in modalities:
        pipeline = builders[modality](device=device)
        versions[modality] = pipeline.version
        log(f"ceiling: {modality} ({pipeline.version}) batch sizes {list(batch_sizes)}")
        rows.extend(measure_encoder(modality, pipeline, media, batch_sizes, min_time_s, min_reps, device=device))
        del pipeline
        gc.collect()
    rows.append(measure_fusion(device, min_time_s=min(1.0, min_time_s)))
    for row in rows:
        log(
            f"  {row['modality']:<6} bs={row['batch_size']:<3} forward {row['forward_items_per_s']:>9.1f}/s"
            f"  decode+forward {row['e2e_items_per_s']:>9.1f}/s"
        )
    return {"device": device, "torch_threads": torch.get_num_threads(), "model_versions": versions, "rows": rows}
