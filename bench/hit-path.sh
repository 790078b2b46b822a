#!/usr/bin/env bash
# Hit path: wrk against the gateway serving a cached 2 KB fragment, and against a minimal
# hyper server returning the same 2 KB, in the same run. Both servers run on CPU 0 and wrk
# on CPU 1 (taskset), and the two are measured in alternating rounds, so a machine whose
# speed drifts affects both alike. Prints every round, the medians and their ratio.
#   bash bench/hit-path.sh [SECONDS_PER_ROUND] [CONNECTIONS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; conns=${2:-64}; rounds=${3:-5}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tessera-gateway -p tessera-bench
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

taskset -c 0 target/release/plain-server 127.0.0.1:18081 2048 2>/dev/null & pids+=($!)
cat > "$tmp/tessera.toml" <<TOML
[gateway]
listen = "127.0.0.1:18080"
[upstream]
url = "http://127.0.0.1:18081"
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
TOML
RUST_LOG=warn taskset -c 0 target/release/tessera-gateway --config "$tmp/tessera.toml" & pids+=($!)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' http://127.0.0.1:18080/fragments/bench || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "gateway never served the fragment (last status $code)"; exit 1; }
size=$(curl -s http://127.0.0.1:18080/fragments/bench | wc -c)
echo "fragment size: $size bytes"

rate() { taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency "$1" | tee -a "$2" | awk '/Requests\/sec/ {print $2}'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
taskset -c 1 wrk -t1 -c"$conns" -d2s http://127.0.0.1:18081/_render/bench >/dev/null   # warm-up
taskset -c 1 wrk -t1 -c"$conns" -d2s http://127.0.0.1:18080/fragments/bench >/dev/null
for r in $(seq "$rounds"); do
  p=$(rate http://127.0.0.1:18081/_render/bench "$tmp/plain.txt"); echo "$p" >>"$tmp/plain.rates"
  g=$(rate http://127.0.0.1:18080/fragments/bench "$tmp/gw.txt"); echo "$g" >>"$tmp/gw.rates"
  awk -v r="$r" -v g="$g" -v p="$p" 'BEGIN { printf "round %d: plain %.0f req/s, gateway %.0f req/s, ratio %.2f\n", r, p, g, g / p }'
done
plain=$(median <"$tmp/plain.rates")
gateway=$(median <"$tmp/gw.rates")
echo "p99 latency, plain:   $(awk '/ 99%/ {print $2}' "$tmp/plain.txt" | tr '\n' ' ')"
echo "p99 latency, gateway: $(awk '/ 99%/ {print $2}' "$tmp/gw.txt" | tr '\n' ' ')"
echo "plain hyper server (median): $plain req/s"
echo "tessera gateway (median):    $gateway req/s"
awk -v g="$gateway" -v p="$plain" 'BEGIN { printf "ratio gateway/plain: %.2f\n", g / p }'
