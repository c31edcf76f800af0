"""Benchmark harness: the Serve graph against the models' in-process ceiling and a naive server.

Run ``python -m bench.run`` (see ``python -m bench.run --help``); it writes ``reports/bench.json``,
``reports/bench.md`` and ``reports/bench.png``. Also: ``python -m bench.profile`` (where a text request's
milliseconds go, per hop, with py-spy -> ``reports/profile_text.json``, quoted in bench.md),
``python -m bench.sweep`` (the batching sweep -> ``reports/batching_sweep.json``) and ``bash bench/gpu.sh``
(the GPU run -> ``reports/bench_gpu.{json,md}``).
"""
