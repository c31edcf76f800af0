"""Benchmark harness: the Serve graph against the models' in-process ceiling and a naive server.

Run ``python -m bench.run`` (see ``python -m bench.run --help``); it writes ``reports/bench.json``,
``reports/bench.md`` and ``reports/bench.png``.
"""
