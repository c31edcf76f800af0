"""Turn measured results into ``bench.json``, a markdown table and a latency/throughput plot."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.load import ENDPOINTS
from bench.stats import LoadResult, best_ceiling, composite_ceiling, ratio

# The throughput targets at 32 concurrent clients on the 2-core reference machine:
TARGET_CEILING_RATIO = 0.4  # text through Serve >= 0.4x the in-process batched ceiling
TARGET_NAIVE_RATIO = 1.5  # ... and >= 1.5x the naive single-process server
TARGET_TEXT_BATCH = 8.0  # the text encoder's mean batch at 32 clients
TARGET_MEDIA_NAIVE_RATIO = 1.0  # fused /predict and /predict/video at 32 clients: no slower than naive
TARGET_CONCURRENCY = 32
TARGET_LITSERVE_RATIO = 1.0  # text at 32 clients: Serve's throughput >= LitServe's (with its batching)
TARGET_LITSERVE_P50 = 1.1  # text at 1 client: Serve's p50 <= 1.1x LitServe's
README_TABLE_START = "<!-- bench:table -->"
README_TABLE_END = "<!-- /bench:table -->"


def ceilings_by_endpoint(ceiling_rows: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """In-process ceiling (requests/s) of each endpoint: its modalities one after another, each at its best batch size.

    Uses decode+forward throughput (what a server has to do), plus the fusion module's time when the
    endpoint combines two or more modalities.
    """
    rows = list(ceiling_rows)
    best = {m: best_ceiling(rows, m) for m in ("text", "audio", "video", "fusion")}
    out: dict[str, float | None] = {}
    for key, endpoint in ENDPOINTS.items():
        fuses = len(endpoint.modalities) > 1 and best.get("fusion")  # one modality answers without fusion
        needed = list(endpoint.modalities) + (["fusion"] if fuses else [])
        value = composite_ceiling({k: v for k, v in best.items() if v}, needed)
        out[key] = round(value, 3) if value else None
    return out


def build_rows(results: Iterable[LoadResult], ceilings: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Summaries of every load cell with ``vs_ceiling``, ``vs_naive`` and ``vs_litserve`` ratios (throughput over
    throughput) and ``p50_vs_litserve`` (p50 over LitServe's p50 at the same endpoint and concurrency)."""
    summaries = [r.summary() for r in results]
    naive = {(s["endpoint"], s["concurrency"]): s["throughput_rps"] for s in summaries if s["target"] == "naive"}
    lit = {(s["endpoint"], s["concurrency"]): s for s in summaries if s["target"] == "litserve"}
    for s in summaries:
        key = (s["endpoint"], s["concurrency"])
        s["ceiling_rps"] = ceilings.get(s["endpoint"])
        s["vs_ceiling"] = ratio(s["throughput_rps"], s["ceiling_rps"])
        s["vs_naive"] = ratio(s["throughput_rps"], naive.get(key))
        s["vs_litserve"] = ratio(s["throughput_rps"], (lit.get(key) or {}).get("throughput_rps"))
        s["p50_vs_litserve"] = ratio(s["p50_ms"], (lit.get(key) or {}).get("p50_ms"))
    order = {"serve": 0, "litserve": 1, "naive": 2}
    keys = list(ENDPOINTS)
    summaries.sort(
        key=lambda s: (
            order.get(s["target"], 9),
            keys.index(s["endpoint"]) if s["endpoint"] in keys else 99,
            s["concurrency"],
        )
    )
    return summaries


def _serve_row(
    rows: Iterable[Mapping[str, Any]], endpoint: str, clients: int = TARGET_CONCURRENCY
) -> Mapping[str, Any] | None:
    return next(
        (r for r in rows if r["target"] == "serve" and r["endpoint"] == endpoint and r["concurrency"] == clients),
        None,
    )


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def _at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def evaluate_targets(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The targets of the Serve graph (the ``TARGET_*`` constants), at 32 concurrent clients unless said.

    Text: throughput over the in-process ceiling, over the naive server and over LitServe, the text encoder's mean
    batch, and at 1 client its p50 over LitServe's; fused ``/predict`` and ``/predict/video``: throughput over
    the naive server's.
    """
    rows = list(rows)
    row = _serve_row(rows, "text")
    vs_ceiling = row.get("vs_ceiling") if row else None
    vs_naive = row.get("vs_naive") if row else None
    batch = ((row.get("mean_batch_size") or {}).get("text") if row else None) or None
    out: dict[str, Any] = {
        "text_32_vs_ceiling": vs_ceiling,
        "text_32_vs_ceiling_target": TARGET_CEILING_RATIO,
        "text_32_vs_ceiling_met": _at_least(vs_ceiling, TARGET_CEILING_RATIO),
        "text_32_vs_naive": vs_naive,
        "text_32_vs_naive_target": TARGET_NAIVE_RATIO,
        "text_32_vs_naive_met": _at_least(vs_naive, TARGET_NAIVE_RATIO),
        "text_32_mean_batch": batch,
        "text_32_mean_batch_target": TARGET_TEXT_BATCH,
        "text_32_mean_batch_met": _at_least(batch, TARGET_TEXT_BATCH),
    }
    lit32 = row.get("vs_litserve") if row else None
    one = _serve_row(rows, "text", 1)
    lit1 = one.get("p50_vs_litserve") if one else None
    out |= {
        "text_32_vs_litserve": lit32,
        "text_32_vs_litserve_target": TARGET_LITSERVE_RATIO,
        "text_32_vs_litserve_met": _at_least(lit32, TARGET_LITSERVE_RATIO),
        "text_1_p50_vs_litserve": lit1,
        "text_1_p50_vs_litserve_target": TARGET_LITSERVE_P50,
        "text_1_p50_vs_litserve_met": _at_most(lit1, TARGET_LITSERVE_P50),
    }
    for endpoint in ("fused", "video"):
        media_row = _serve_row(rows, endpoint)
        value = media_row.get("vs_naive") if media_row else None
        out[f"{endpoint}_32_vs_naive"] = value
        out[f"{endpoint}_32_vs_naive_target"] = TARGET_MEDIA_NAIVE_RATIO
        out[f"{endpoint}_32_vs_naive_met"] = _at_least(value, TARGET_MEDIA_NAIVE_RATIO)
    return out


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _met(flag: bool | None) -> str:
    return "not measured" if flag is None else ("met" if flag else "NOT met")


def machine_line(meta: Mapping[str, Any]) -> str:
    """One line: cores, CPU, memory, GPU, commit."""
    m = meta.get("machine", {})
    gpu = ", ".join(m.get("gpu") or []) or "no GPU"
    dirty = " (+ uncommitted changes)" if m.get("commit_dirty") else ""
    load = m.get("loadavg_at_start")
    load_txt = f", load average at start {load[0]}" if load else ""
    return (
        f"{m.get('cpu_count')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB RAM, {gpu}; "
        f"commit `{m.get('commit')}`{dirty}; torch {m.get('torch')}, Ray {m.get('ray')}{load_txt}"
    )


def serve_settings_lines(config: Mapping[str, Any] | None) -> list[str]:
    """One markdown bullet per encoder: batching, threads and replicas as run by the Serve config."""
    if not config:
        return []
    lines = []
    for app in config.get("applications", []):
        encoders = (app.get("args") or {}).get("encoders") or {}
        deployments = {d.get("name"): d for d in app.get("deployments") or []}
        for modality, enc in encoders.items():
            dep = deployments.get(f"{modality.capitalize()}Encoder", {})
            auto = dep.get("autoscaling_config") or {}
            replicas = (
                f"{auto.get('min_replicas')}-{auto.get('max_replicas')} (autoscaling)"
                if auto
                else str(dep.get("num_replicas", "default"))
            )
            cpus = (dep.get("ray_actor_options") or {}).get("num_cpus")
            gpus = (dep.get("ray_actor_options") or {}).get("num_gpus")
            lines.append(
                f"- `{modality}`: max_batch_size {enc.get('max_batch_size')}, batch_wait_timeout_s "
                f"{enc.get('batch_wait_timeout_s')}, max_ongoing_requests {enc.get('max_ongoing_requests')}, "
                f"torch_threads {enc.get('torch_threads')}, replicas {replicas}, num_cpus {cpus}, num_gpus {gpus}"
            )
    return lines


def results_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown table of every load cell."""
    lines = [
        (
            "| target | endpoint | clients | ok/err | req/s | p50 ms | p95 ms | p99 ms | × ceiling | × naive "
            "| × LitServe | p50 ÷ LitServe's | server CPU ms/req | batch seen | GPU util |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        gpu = r.get("gpu") or {}
        lines.append(
            f"| {r['target']} | `{r.get('path', r['endpoint'])}` | {r['concurrency']} "
            f"| {r['requests_ok']}/{r['errors']} "
            f"| {_fmt(r['throughput_rps'])} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} "
            f"| {_fmt(r.get('vs_ceiling'), 2)} | {_fmt(r.get('vs_naive'), 2)} "
            f"| {_fmt(r.get('vs_litserve'), 2)} | {_fmt(r.get('p50_vs_litserve'), 2)} "
            f"| {_fmt(r.get('server_cpu_ms_per_request'), 1)} "
            f"| {' '.join(f'{m} {v:.1f}' for m, v in (r.get('mean_batch_size') or {}).items()) or '–'} "
            f"| {_fmt(gpu.get('gpu_util_mean_pct'), 0, '%') if gpu else '–'} |"
        )
    return "\n".join(lines)


def cpu_breakdown_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Where the server's CPU went, per process, at each endpoint's highest concurrency (ms per request)."""
    rows = [r for r in rows if r.get("server_cpu_breakdown_ms_per_request")]
    top: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        key = (r["target"], r["endpoint"])
        if key not in top or r["concurrency"] > top[key]["concurrency"]:
            top[key] = r
    lines = []
    for (target, _), r in top.items():
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in list(r["server_cpu_breakdown_ms_per_request"].items())[:8])
        client = r.get("client_cpu_ms_per_request")
        lines.append(
            f"- {target} `{r.get('path', r['endpoint'])}` at {r['concurrency']} clients: {parts}"
            + (f" (load generator: {client:.1f})" if client is not None else "")
        )
    return lines


def ceiling_table(ceiling: Mapping[str, Any]) -> str:
    """Markdown table of the in-process ceiling."""
    lines = [
        "| encoder | batch | forward items/s | decode+forward items/s | ms/batch (forward) | decode ms/item |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in ceiling.get("rows", []):
        lines.append(
            f"| {r['modality']} | {r['batch_size']} | {_fmt(r['forward_items_per_s'])} | {_fmt(r['e2e_items_per_s'])} "
            f"| {_fmt(r['forward_ms_per_batch'], 2)} | {_fmt(r.get('prepare_ms_per_item'), 1)} |"
        )
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole ``bench.md``."""
    meta = report["meta"]
    targets = report.get("targets", {})
    ceil_ep = report.get("ceiling_by_endpoint", {})
    settings = serve_settings_lines(meta.get("servers", {}).get("serve", {}).get("config"))
    breakdown = cpu_breakdown_lines(report.get("results", []))
    parts = [
        "# Benchmark: Serve graph vs LitServe vs naive server vs in-process ceiling",
        "",
        f"Measured {meta.get('finished_at', '')} with `{meta.get('command', 'python -m bench.run')}`.",
        "",
        f"**Machine:** {machine_line(meta)}.",
        "",
        (
            f"**Serve config:** `{meta.get('serve_config')}`; device `{meta.get('device')}`; "
            f"inputs: {meta.get('inputs', {}).get('audio', {}).get('name')}, "
            f"{meta.get('inputs', {}).get('video', {}).get('name')}, {meta.get('inputs', {}).get('texts')} texts."
        ),
        "",
        "## Targets (32 concurrent clients unless said)",
        "",
        *target_lines(targets),
        "",
        *(["Serve encoder settings in this run:", "", *settings, ""] if settings else []),
        *litserve_settings_lines(
            next((v.get("config") for k, v in meta.get("servers", {}).items() if k.startswith("litserve")), None)
        ),
        "## HTTP results",
        "",
        results_table(report.get("results", [])),
        "",
        "× ceiling: throughput over the in-process ceiling of that endpoint (its encoders' best decode+forward "
        "throughput over batch sizes, one after another, plus fusion when it combines modalities): "
        + ", ".join(f"`{ENDPOINTS[k].path}` {_fmt(v)} req/s" for k, v in ceil_ep.items() if k in ENDPOINTS)
        + ". × naive, × LitServe: throughput over the naive server's, LitServe's, at the same endpoint and "
        "concurrency; p50 ÷ LitServe's: p50 over LitServe's p50 there. "
        "Server CPU: CPU time of the server's whole process tree (Ray, proxy, replicas, ffmpeg) per request sent. "
        "Batch seen: mean size of the encoder forward that served each request, as the answers report it.",
        "",
        *(["## Where the CPU went (ms of CPU per request, by process)", "", *breakdown, ""] if breakdown else []),
        *profile_section(report.get("profile") or []),
        *levers_section(report.get("levers")),
        *litserve_sweep_section(report.get("litserve_sweep")),
        "## In-process ceiling",
        "",
        (
            f"torch threads: {report.get('ceiling', {}).get('torch_threads')}, "
            f"device: {report.get('ceiling', {}).get('device')}."
        ),
        "",
        ceiling_table(report.get("ceiling", {})),
        "",
    ]
    partial = [
        f"{r['target']} `{r.get('path', r['endpoint'])}` at {r['concurrency']} clients: "
        + ", ".join(f"{n} without {m}" for m, n in r["answers_missing_modalities"].items())
        for r in report.get("results", [])
        if r.get("answers_missing_modalities")
    ]
    if partial:
        parts += [
            "Answers (HTTP 200) that lacked a modality the request carried:",
            "",
            *[f"- {p}" for p in partial],
            "",
        ]
    notes = meta.get("notes") or []
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def target_lines(targets: Mapping[str, Any]) -> list[str]:
    """One markdown bullet per throughput target (see :func:`evaluate_targets`)."""
    specs = (
        ("text_32_vs_ceiling", "text: Serve / in-process batched ceiling", 2, ""),
        ("text_32_vs_naive", "text: Serve / naive server", 2, ""),
        ("text_32_vs_litserve", "text: Serve / LitServe (throughput)", 2, ""),
        ("text_1_p50_vs_litserve", "text at 1 client: Serve p50 / LitServe p50", 2, "max"),
        ("text_32_mean_batch", "text: the text encoder's mean batch", 1, ""),
        ("fused_32_vs_naive", "fused `/predict`: Serve / naive server", 2, ""),
        ("video_32_vs_naive", "`/predict/video`: Serve / naive server", 2, ""),
    )
    return [
        f"- {name}: **{_fmt(targets.get(key), digits)}** (target {'≤' if kind == 'max' else '≥'} "
        f"{targets.get(f'{key}_target')}) — {_met(targets.get(f'{key}_met'))}"
        for key, name, digits, kind in specs
        if f"{key}_target" in targets
    ]


def profile_section(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """``bench.profile``'s entries: a text request's CPU by hop and category under load, and its latency split."""
    entries = [e for e in entries if e.get("under_load") or e.get("single_request")]
    entries.sort(key=lambda e: e.get("label") != "before")  # "before" first, the rest as recorded
    if not entries:
        return []
    labels = [e["label"] for e in entries]
    lines = [
        "## Where a text request's milliseconds go (profiled, `python -m bench.profile`)",
        "",
        (
            "Each column is one `serve run` of the Serve graph, profiled with py-spy while 32 clients load "
            "`/api/predict`: "
            "every hop's CPU per request (from `/proc`) split by what its Python stacks were doing; the CPU its Python "
            "stacks do not account for is Ray's core-worker threads (C++). py-spy's sampling takes CPU from the "
            "same two "
            "cores, so the req/s quoted here are below bench.run's (the HTTP table). The lower table splits the median "
            "wall time of one request sent alone."
        ),
        "",
    ]
    for e in entries:
        ul = e.get("under_load") or {}
        lines.append(
            f"- **{e['label']}**: {e.get('note') or ''} "
            f"(ingress `{e.get('ingress')}`, measured {e.get('measured_at')}; "
            f"{_fmt(ul.get('throughput_rps'))} req/s at {ul.get('clients')} clients, p50 {_fmt(ul.get('p50_ms'))} ms, "
            f"text batch {_fmt((ul.get('mean_batch_size') or {}).get('text'))}, whole server "
            f"{_fmt(ul.get('server_cpu_ms_per_request'), 2)} ms CPU/request)"
        )
    lines += [
        "",
        "| hop: what (ms of CPU per request, 32 clients) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    hops: list[str] = []
    for e in entries:
        hops += [h for h in ((e.get("under_load") or {}).get("by_hop") or {}) if h not in hops]
    keys: list[tuple[str, str]] = []
    for hop in hops:  # each hop, then its categories (from every entry), grouped under it
        keys.append((hop, ""))
        for e in entries:
            split = ((((e.get("under_load") or {}).get("by_hop") or {}).get(hop) or {}).get("split")) or {}
            keys += [(hop, cat) for cat in split if (hop, cat) not in keys]
    for hop, cat in keys:
        cells = []
        for e in entries:
            data = ((e.get("under_load") or {}).get("by_hop") or {}).get(hop) or {}
            value = data.get("cpu_ms_per_request") if not cat else (data.get("split") or {}).get(cat)
            cells.append(f"**{_fmt(value, 2)}**" if not cat and value is not None else _fmt(value, 2))
        lines.append(f"| {'**' + hop + '**' if not cat else '&nbsp;&nbsp;' + cat} | " + " | ".join(cells) + " |")
    totals = [_fmt((e.get("under_load") or {}).get("server_cpu_ms_per_request"), 2) for e in entries]
    lines.append("| **whole server (every Ray process)** | " + " | ".join(totals) + " |")
    single = [e for e in entries if e.get("single_request")]
    if single:
        lines += [
            "",
            "| one request alone: hop (median ms) | " + " | ".join(e["label"] for e in single) + " |",
            "|---|" + "---:|" * len(single),
        ]
        hop_names: list[str] = []
        for e in single:
            hop_names += [h for h in e["single_request"].get("hops_ms (medians)", {}) if h not in hop_names]
        for hop in hop_names:
            lines.append(
                f"| {hop} | "
                + " | ".join(_fmt(e["single_request"].get("hops_ms (medians)", {}).get(hop), 2) for e in single)
                + " |"
            )
        lines.append(
            "| **client wall time, p50** | "
            + " | ".join(f"**{_fmt(e['single_request'].get('p50_wall_ms'), 2)}**" for e in single)
            + " |"
        )
    return [*lines, ""]


def litserve_settings_lines(config: Mapping[str, Any] | None) -> list[str]:
    """One paragraph: the LitServe settings of the run (from its sweep, ``python -m bench.litserve_sweep``)."""
    lit = (config or {}).get("litserve")
    if not lit:
        return []
    return [
        (
            f"LitServe settings in this run: one server per endpoint, {lit.get('workers')} worker processes (and as "
            f"many HTTP server processes), max_batch_size {lit.get('max_batch_size')}, batch_timeout "
            f"{lit.get('batch_timeout')} s, {lit.get('torch_threads')} torch thread per worker, fast_queue (ZeroMQ) "
            f"{lit.get('fast_queue')}: the best of its sweep (below)."
        ),
        "",
    ]


def litserve_sweep_section(sweep: Mapping[str, Any] | None) -> list[str]:
    """``reports/litserve_sweep.json``: text through LitServe at 1 and 32 clients for each setting tried."""
    points = (sweep or {}).get("points") or []
    if not points:
        return []
    best = sweep.get("best") or {}
    lines = [
        "## LitServe settings sweep (`python -m bench.litserve_sweep`)",
        "",
        str(sweep.get("method", "")),
        "",
        (
            "| workers | torch threads | max_batch_size | batch_timeout s | req/s, 32 clients | mean batch "
            "| p50 ms, 1 client | chosen |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pt in points:
        st = pt.get("settings") or {}
        chosen = "**yes**" if st == best else ""
        lines.append(
            f"| {_fmt(st.get('workers'))} | {_fmt(st.get('torch_threads'))} | {_fmt(st.get('max_batch_size'))} "
            f"| {_fmt(st.get('batch_timeout'), 3)} "
            f"| {_fmt(pt.get('throughput_rps_32'))} | {_fmt(pt.get('mean_batch_32'))} | {_fmt(pt.get('p50_ms_1'))} "
            f"| {chosen} |"
        )
    return [*lines, ""]


def levers_section(levers: Mapping[str, Any] | None) -> list[str]:
    """``reports/levers.json``: what each lever did when it was tried (hand-kept record of the runs that chose them)."""
    rows = (levers or {}).get("rows") or []
    if not rows:
        return []
    lines = [
        "## Levers tried",
        "",
        str(levers.get("method", "")),
        "",
        "| lever | endpoint, clients | before | after | kept |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['where']} | {r['before']} | {r['after']} | {r['kept']} |")
    return [*lines, ""]


def readme_block(report: Mapping[str, Any]) -> str:
    """The summary quoted in the README: Serve against LitServe and the naive server per endpoint, and the targets
    (batches, CPU and the ratios per cell are in bench.md)."""
    rows = {(r["target"], r["endpoint"], r["concurrency"]): r for r in report.get("results", [])}
    busy = " (busy: shared with other jobs)" if any("busy" in n for n in report["meta"].get("notes") or []) else ""
    lines = [
        f"`python -m bench.run` on {machine_line(report['meta']).split('; commit')[0]}{busy}:",
        "",
        "| endpoint | clients | req/s: Serve | LitServe | naive | p50 ms: Serve | LitServe |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (target, endpoint, clients), r in rows.items():
        naive = rows.get(("naive", endpoint, clients))
        lit = rows.get(("litserve", endpoint, clients))
        if target != "serve" or (clients != 32 and not (endpoint == "text" and clients == 1)):
            continue
        lines.append(
            f"| `{r.get('path', endpoint)}` | {clients} | {_fmt(r['throughput_rps'])} "
            f"| {_fmt(lit['throughput_rps']) if lit else '–'} | {_fmt(naive['throughput_rps']) if naive else '–'} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(lit['p50_ms']) if lit else '–'} |"
        )
    t = report.get("targets", {})
    checks = [
        ("text Serve/LitServe", "text_32_vs_litserve"),
        ("text Serve/naive", "text_32_vs_naive"),
        ("text Serve/ceiling", "text_32_vs_ceiling"),
        ("text mean batch", "text_32_mean_batch"),
        ("fused Serve/naive", "fused_32_vs_naive"),
        ("video Serve/naive", "video_32_vs_naive"),
    ]
    met = [
        f"{name} {_fmt(t.get(key), 2)} (≥ {t.get(key + '_target')}, {_met(t.get(key + '_met'))})"
        for name, key in checks
        if key in t
    ]
    if "text_1_p50_vs_litserve" in t:
        met.append(
            f"at 1 client, text p50 Serve/LitServe {_fmt(t.get('text_1_p50_vs_litserve'), 2)} "
            f"(≤ {t.get('text_1_p50_vs_litserve_target')}, {_met(t.get('text_1_p50_vs_litserve_met'))})"
        )
    if met:
        lines += ["", "Targets at 32 clients: " + "; ".join(met) + "."]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the bench table markers in ``readme``; False if the markers are missing."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_TABLE_START) + r".*?" + re.escape(README_TABLE_END), re.DOTALL)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{README_TABLE_START}\n{block}\n{README_TABLE_END}", text, count=1))
    return True


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Throughput (top) and p50/p95/p99 latency (bottom) against concurrency, one column per endpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report.get("results", [])
    endpoints = [k for k in ENDPOINTS if any(r["endpoint"] == k for r in rows)] or list(ENDPOINTS)
    fig, axes = plt.subplots(2, len(endpoints), figsize=(4.2 * len(endpoints), 7.5), squeeze=False)
    colors = {"serve": "tab:blue", "litserve": "tab:green", "naive": "tab:orange"}
    for col, key in enumerate(endpoints):
        top, bottom = axes[0][col], axes[1][col]
        for target, color in colors.items():
            cells = sorted(
                (r for r in rows if r["endpoint"] == key and r["target"] == target), key=lambda r: r["concurrency"]
            )
            if not cells:
                continue
            xs = [r["concurrency"] for r in cells]
            top.plot(xs, [r["throughput_rps"] for r in cells], "o-", color=color, label=target)
            for q, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
                ys = [r[q] if r[q] is not None else float("nan") for r in cells]
                bottom.plot(xs, ys, style, color=color, label=f"{target} {q[:3]}")
        ceiling = report.get("ceiling_by_endpoint", {}).get(key)
        if ceiling:
            top.axhline(ceiling, color="gray", linestyle=":", label="in-process ceiling")
        top.set_title(ENDPOINTS[key].path)
        top.set_ylabel("requests/s")
        bottom.set_ylabel("latency ms")
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in rows}) or [1, 8, 32])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrent clients")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    import textwrap

    lines = [
        "Serve graph vs LitServe vs naive server vs in-process ceiling",
        *textwrap.wrap(machine_line(report["meta"]), int(14 * 4.2 * len(endpoints))),
    ]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(
    report: dict[str, Any], out_dir: Path, raw: Iterable[LoadResult] = (), stem: str = "bench"
) -> dict[str, Path]:
    """Write ``<stem>.json`` (with raw latencies), ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = dict(report)
    full["raw_latencies_ms"] = [
        {
            "target": r.target,
            "endpoint": r.endpoint,
            "concurrency": r.concurrency,
            "latencies_ms": [round(x, 2) for x in r.latencies_ms],
        }
        for r in raw
    ]
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(full, indent=2) + "\n")
    paths["md"].write_text(render_markdown(report))
    plot(report, paths["png"])
    return paths
