#!/usr/bin/env bash
# Hit path: wrk against the gateway serving a cached 2 KB fragment, and against a minimal
# hyper server returning the same 2 KB, in the same run, in alternating rounds (the order
# rotates every round), so a machine whose speed drifts affects all alike. Prints every
# round, the medians, and the median of the rounds' ratios to the plain server. With
# TAGS > 0 the fragment's render answer carries a Surrogate-Key of that many tags. With
# VARY=1 the route varies on a header wrk does not send: same fragment, but no hot
# answers, so every hit takes the full path (route, identity, L1, tag check).
#
# PIN=1 (the default): both servers on CPU 0 with one tokio thread, wrk on CPU 1, so each
# figure is one core's worth. PIN=0: nothing pinned, every server with its defaults, so
# wrk shares the cores with them as a sidecar or a co-located app would; LAYOUTS then
# lists the gateways to run side by side, each a `gateway.threads` value or `default`
# (e.g. LAYOUTS="default 0 1").
#   bash bench/hit-path.sh [SECONDS_PER_ROUND] [CONNECTIONS] [ROUNDS] [TAGS] [VARY]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; conns=${2:-64}; rounds=${3:-5}; tags=${4:-0}; vary=${5:-0}
pin=${PIN:-1}; layouts=${LAYOUTS:-default}
[ "$pin" = 1 ] && layouts=default
vary_line=""; [ "$vary" = 1 ] && vary_line='vary = ["header:x-bench"]'
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tessera-gateway -p tessera-bench
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
me=hit-path
# shellcheck source=bench/ports.sh
source bench/ports.sh
# on_server CMD...: a server, on CPU 0 with one tokio thread when pinned.
# (exec: started with `&`, the server is the process whose pid `$!` is.)
on_server() { if [ "$pin" = 1 ]; then TOKIO_WORKER_THREADS=1 exec taskset -c 0 "$@"; else exec "$@"; fi; }
on_client() { if [ "$pin" = 1 ]; then taskset -c 1 "$@"; else "$@"; fi; }

up=$(pick_port)
on_server target/release/plain-server "127.0.0.1:$up" 2048 "$tags" 2>/dev/null & pids+=($!)
wait_port "$up" plain-server
names=(plain); urls=("http://127.0.0.1:$up/_render/bench"); spids=("${pids[0]}")
for layout in $layouts; do
  port=$(pick_port); admin=$(pick_port); threads_line=""
  [ "$layout" = default ] || threads_line="threads = $layout"
  cat > "$tmp/tessera-$layout.toml" <<TOML
[gateway]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
$threads_line
[upstream]
url = "http://127.0.0.1:$up"
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
$vary_line
TOML
  RUST_LOG=warn on_server target/release/tessera-gateway --config "$tmp/tessera-$layout.toml" & pids+=($!)
  url="http://127.0.0.1:$port/fragments/bench"
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' "$url" || true)
    [ "$code" = 200 ] && break; sleep 0.1
  done
  [ "$code" = 200 ] || { echo "gateway ($layout) never served the fragment (last status $code)"; exit 1; }
  names+=("gateway-$layout"); urls+=("$url"); spids+=("${pids[-1]}")
done
size=$(curl -s "${urls[1]}" | wc -c)
echo "fragment size: $size bytes; tags: $tags; vary (no hot answers): $vary; pinned: $pin; layouts: $layouts"

# CPU ticks (user + system) a process has used so far.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# One round against URL served by PID: prints "REQ_PER_S CPU_MICROSECONDS_PER_REQUEST".
round() { # url, pid, wrk output file
  local before after out
  before=$(ticks "$2")
  out=$(on_client wrk -t1 -c"$conns" -d"${secs}s" --latency "$1")
  after=$(ticks "$2")
  echo "$out" >>"$3"
  awk -v b="$before" -v a="$after" -v hz="$hz" '
    /requests in/ { n = $1 }
    /Requests\/sec/ { r = $2 }
    END { printf "%.0f %.2f\n", r, (a - b) / hz * 1e6 / n }' <<<"$out"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
n=${#names[@]}
for i in $(seq 0 $((n - 1))); do on_client wrk -t1 -c"$conns" -d2s "${urls[$i]}" >/dev/null; done   # warm-up
for r in $(seq "$rounds"); do
  line="round $r:"
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r) % n ))
    read -r rate cpu < <(round "${urls[$i]}" "${spids[$i]}" "$tmp/${names[$i]}.txt")
    echo "$rate $cpu" >>"$tmp/${names[$i]}.rates"
    line+=" ${names[$i]} $rate req/s ${cpu} us CPU/req;"
  done
  echo "$line"
  read -r p pc < <(tail -1 "$tmp/plain.rates")
  for i in $(seq 1 $((n - 1))); do
    read -r g gc < <(tail -1 "$tmp/${names[$i]}.rates")
    awk -v g="$g" -v p="$p" -v gc="$gc" -v pc="$pc" 'BEGIN { print g / p, pc / gc }' >>"$tmp/${names[$i]}.ratios"
  done
done
plain=$(cut -d' ' -f1 "$tmp/plain.rates" | median); plain_cpu=$(cut -d' ' -f2 "$tmp/plain.rates" | median)
echo "p99 latency, plain: $(awk '/ 99%/ {print $2}' "$tmp/plain.txt" | tr '\n' ' ')"
echo "plain hyper server (median): $plain req/s, $plain_cpu us CPU per request"
for i in $(seq 1 $((n - 1))); do
  name=${names[$i]}
  g=$(cut -d' ' -f1 "$tmp/$name.rates" | median); gc=$(cut -d' ' -f2 "$tmp/$name.rates" | median)
  echo "p99 latency, $name: $(awk '/ 99%/ {print $2}' "$tmp/$name.txt" | tr '\n' ' ')"
  echo "$name (median): $g req/s, $gc us CPU per request"
  awk -v name="$name" -v g="$g" -v p="$plain" -v gc="$gc" -v pc="$plain_cpu" 'BEGIN {
    printf "%s/plain, ratio of the medians: %.2f by throughput, %.2f by CPU per request (plain/gateway)\n", name, g / p, pc / gc }'
  printf "%s/plain, median of the rounds' ratios: %.2f by throughput, %.2f by CPU per request\n" "$name" \
    "$(cut -d' ' -f1 "$tmp/$name.ratios" | median)" "$(cut -d' ' -f2 "$tmp/$name.ratios" | median)"
done
