#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it. Exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-dev.txt
apt_install() {  # apt_install "<which tests>" PACKAGE...: install Debian packages as root, else say what is skipped
  local tests=$1
  shift
  if [ "$(id -u)" != 0 ]; then
    echo "warning: not root, $* not installed; $tests will be skipped"
    return
  fi
  if [ -z "${apt_updated:-}" ]; then
    apt-get update -qq || true
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || echo "warning: could not install $*; $tests will be skipped"
}
if ! command -v chromium >/dev/null 2>&1; then
  # Browser tests drive Debian's Chromium (Playwright cannot download its own browser here).
  apt_install "browser tests" chromium fonts-noto-color-emoji
fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  # Monitoring tests run Debian's Prometheus against the live service and promtool on the alert rules.
  apt_install "Prometheus tests" prometheus
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
set +e
python3 -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose"
  exit 1
fi
exit "$status"
