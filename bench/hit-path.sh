#!/usr/bin/env bash
# Hit path: wrk against the gateway serving a cached 2 KB fragment, and against a minimal
# hyper server returning the same 2 KB, in the same run. Both servers run on CPU 0 and wrk
# on CPU 1 (taskset), and the two are measured in alternating rounds (which goes first
# alternates too), so a machine whose speed drifts affects both alike. Prints every round,
# the medians, and the median of the rounds' ratios. With TAGS > 0 the fragment's render
# answer carries a Surrogate-Key of that many tags. With VARY=1 the route varies on a
# header wrk does not send: same fragment, but no hot answers, so every hit takes the full
# path (route, identity, L1, tag check).
#   bash bench/hit-path.sh [SECONDS_PER_ROUND] [CONNECTIONS] [ROUNDS] [TAGS] [VARY]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; conns=${2:-64}; rounds=${3:-5}; tags=${4:-0}; vary=${5:-0}
vary_line=""; [ "$vary" = 1 ] && vary_line='vary = ["header:x-bench"]'
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tessera-gateway -p tessera-bench
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

TOKIO_WORKER_THREADS=1 taskset -c 0 target/release/plain-server 127.0.0.1:18081 2048 "$tags" 2>/dev/null & pids+=($!)
cat > "$tmp/tessera.toml" <<TOML
[gateway]
listen = "127.0.0.1:18080"
[upstream]
url = "http://127.0.0.1:18081"
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
$vary_line
TOML
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 target/release/tessera-gateway --config "$tmp/tessera.toml" & pids+=($!)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' http://127.0.0.1:18080/fragments/bench || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "gateway never served the fragment (last status $code)"; exit 1; }
size=$(curl -s http://127.0.0.1:18080/fragments/bench | wc -c)
echo "fragment size: $size bytes; tags: $tags; vary (no hot answers): $vary"

plain_pid=${pids[0]}; gateway_pid=${pids[1]}
# CPU ticks (user + system) a process has used so far.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# One round against URL served by PID: prints "REQ_PER_S CPU_MICROSECONDS_PER_REQUEST".
round() { # url, pid, wrk output file
  local before after out
  before=$(ticks "$2")
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency "$1")
  after=$(ticks "$2")
  echo "$out" >>"$3"
  awk -v b="$before" -v a="$after" -v hz="$hz" '
    /requests in/ { n = $1 }
    /Requests\/sec/ { r = $2 }
    END { printf "%.0f %.2f\n", r, (a - b) / hz * 1e6 / n }' <<<"$out"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
taskset -c 1 wrk -t1 -c"$conns" -d2s http://127.0.0.1:18081/_render/bench >/dev/null   # warm-up
taskset -c 1 wrk -t1 -c"$conns" -d2s http://127.0.0.1:18080/fragments/bench >/dev/null
for r in $(seq "$rounds"); do
  if (( r % 2 )); then
    read -r p pc < <(round http://127.0.0.1:18081/_render/bench "$plain_pid" "$tmp/plain.txt")
    read -r g gc < <(round http://127.0.0.1:18080/fragments/bench "$gateway_pid" "$tmp/gw.txt")
  else
    read -r g gc < <(round http://127.0.0.1:18080/fragments/bench "$gateway_pid" "$tmp/gw.txt")
    read -r p pc < <(round http://127.0.0.1:18081/_render/bench "$plain_pid" "$tmp/plain.txt")
  fi
  echo "$p $pc" >>"$tmp/plain.rates"; echo "$g $gc" >>"$tmp/gw.rates"
  awk -v g="$g" -v p="$p" -v gc="$gc" -v pc="$pc" 'BEGIN { print g / p, pc / gc }' >>"$tmp/ratios"
  awk -v r="$r" -v g="$g" -v p="$p" -v gc="$gc" -v pc="$pc" 'BEGIN {
    printf "round %d: plain %.0f req/s %.2f us CPU/req; gateway %.0f req/s %.2f us CPU/req; ratio %.2f\n", r, p, pc, g, gc, g / p }'
done
plain=$(cut -d' ' -f1 "$tmp/plain.rates" | median); plain_cpu=$(cut -d' ' -f2 "$tmp/plain.rates" | median)
gateway=$(cut -d' ' -f1 "$tmp/gw.rates" | median); gateway_cpu=$(cut -d' ' -f2 "$tmp/gw.rates" | median)
echo "p99 latency, plain:   $(awk '/ 99%/ {print $2}' "$tmp/plain.txt" | tr '\n' ' ')"
echo "p99 latency, gateway: $(awk '/ 99%/ {print $2}' "$tmp/gw.txt" | tr '\n' ' ')"
echo "plain hyper server (median): $plain req/s, $plain_cpu us CPU per request"
echo "tessera gateway (median):    $gateway req/s, $gateway_cpu us CPU per request"
awk -v g="$gateway" -v p="$plain" -v gc="$gateway_cpu" -v pc="$plain_cpu" 'BEGIN {
  printf "ratio of the medians, gateway/plain: %.2f by throughput, %.2f by CPU per request (plain/gateway)\n", g / p, pc / gc }'
printf "median of the rounds' ratios: %.2f by throughput, %.2f by CPU per request\n" \
  "$(cut -d' ' -f1 "$tmp/ratios" | median)" "$(cut -d' ' -f2 "$tmp/ratios" | median)"
