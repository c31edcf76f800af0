#!/bin/sh
# HAProxy as the benchmark runs it (RAY_SERVE_HAPROXY_BINARY_PATH points here; bench/servers.py sets it up).
# Ray Serve's HAProxy template binds its stats and Prometheus frontends on all interfaces (`bind *:PORT`,
# `bind :PORT`); the benchmark keeps everything on loopback, so those binds are rewritten to 127.0.0.1 in the
# config file HAProxy is given, then the real binary ($BENCH_HAPROXY_BINARY) replaces this script (same pid).
prev=""
cfg=""
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then cfg="$arg"; fi
  prev="$arg"
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E 's/^([[:space:]]*bind[[:space:]]+)(\*)?:([0-9]+)/\1127.0.0.1:\3/' "$cfg"
fi
exec "${BENCH_HAPROXY_BINARY:?BENCH_HAPROXY_BINARY is not set}" "$@"
