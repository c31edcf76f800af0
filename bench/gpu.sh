#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with an NVIDIA GPU (about 8 minutes):
#
#   bash bench/gpu.sh                      # install, then bench.run on deploy/serve_config.gpu.yaml
#   bash bench/gpu.sh --dry-run            # print what it would run, run nothing (works without a GPU)
#   bash bench/gpu.sh --clients 1,32 --out /tmp/gpu-run --no-install
#
# It installs requirements.txt and LitServe (its pin in requirements-dev.txt), then runs `python -m bench.run
# --device cuda` against deploy/serve_config.gpu.yaml (started by the benchmark itself: `serve run` on a free
# loopback port, behind HAProxy as `python -m serve.launch` runs it) at 1/8/32/128 clients on the four endpoints,
# next to LitServe with batching (bench/litserve_server.py), the naive server and the in-process ceiling on the
# same GPU, and writes <out>/bench_gpu.{json,md,png} with GPU
# utilisation (nvidia-smi, sampled during every cell). The config's API keys and per-client limits are turned
# off for the run (--open-access): the load generator sends no key and all its clients share one address.
# The run is stopped with SIGINT at the time limit (the reports are still written, with what was measured).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
usage: bash bench/gpu.sh [--dry-run] [--clients LIST] [--out DIR] [--endpoints LIST] [--duration S]
                         [--requests N] [--time-limit S] [--no-install]
  --dry-run        print the install and benchmark commands, run nothing (no GPU needed)
  --clients LIST   concurrent clients, comma-separated (default 1,8,32,128)
  --out DIR        output folder for bench_gpu.{json,md,png} (default reports)
  --endpoints LIST of text,audio,video,fused (default all four)
  --duration S     max seconds per cell (default 5)
  --requests N     max requests per cell (default 4000)
  --time-limit S   the whole script's budget in seconds, install included (default 480)
  --no-install     skip pip install -r requirements.txt (and litserve)
USAGE
}

die() { echo "bench/gpu.sh: $*" >&2; echo >&2; usage >&2; exit 2; }

clients=1,8,32,128
out=reports
endpoints=text,audio,video,fused
duration=5
requests=4000
time_limit=480
dry_run=0
install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --clients|--out|--endpoints|--duration|--requests|--time-limit)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      case "$1" in
        --clients) clients=$2 ;;
        --out) out=$2 ;;
        --endpoints) endpoints=$2 ;;
        --duration) duration=$2 ;;
        --requests) requests=$2 ;;
        --time-limit) time_limit=$2 ;;
      esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ $clients =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--clients wants positive integers separated by commas, got '$clients'"
[[ $endpoints =~ ^(text|audio|video|fused)(,(text|audio|video|fused))*$ ]] || die "--endpoints wants text,audio,video,fused, got '$endpoints'"
[[ $duration =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--duration wants seconds, got '$duration'"
[[ $requests =~ ^[1-9][0-9]*$ ]] || die "--requests wants a positive integer, got '$requests'"
[[ $time_limit =~ ^[1-9][0-9]*$ ]] || die "--time-limit wants whole seconds, got '$time_limit'"

python=${PYTHON:-python3}
litserve_pin=$(grep -E '^litserve' requirements-dev.txt | sed 's/[[:space:]]*#.*//')
install_cmd=("$python" -m pip install -q -r requirements.txt "${litserve_pin:-litserve}")
bench_cmd=("$python" -m bench.run --device cuda --config deploy/serve_config.gpu.yaml --open-access
           --targets ceiling,naive,litserve,serve
           --concurrency "$clients" --endpoints "$endpoints" --duration "$duration" --requests "$requests"
           --ceiling-time 1 --stem bench_gpu --out "$out")

if [ "$dry_run" = 1 ]; then
  [ "$install" = 1 ] && echo "install: ${install_cmd[*]}"
  echo "bench: ${bench_cmd[*]}"
  echo "writes: $out/bench_gpu.json $out/bench_gpu.md $out/bench_gpu.png"
  echo "time limit: ${time_limit}s"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); use --dry-run to see the commands" >&2
  exit 3
fi
nvidia-smi -L
if [ "$install" = 1 ]; then
  "${install_cmd[@]}"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} RAY_USAGE_STATS_ENABLED=0
left=$(( time_limit - SECONDS ))
if [ "$left" -lt 60 ]; then
  echo "bench/gpu.sh: only ${left}s of the ${time_limit}s budget left after the install" >&2
  exit 4
fi
echo "running (at most ${left}s): ${bench_cmd[*]}"
status=0
timeout -s INT -k 30 "$left" "${bench_cmd[@]}" || status=$?
if [ "$status" = 124 ]; then
  echo "bench/gpu.sh: time limit reached; $out/bench_gpu.md holds what was measured" >&2
fi
exit "$status"
