#!/usr/bin/env bash
# Hit path, counted: the instructions per request that the gateway serving a cached 2 KB
# fragment and plain-server returning the same 2 KB execute in user space, each run
# under callgrind while wrk sends it requests. Unlike hit-path.sh's throughput, the count
# does not depend on what else the machine is doing, so it is the figure to compare
# changes with. It leaves out the kernel, which does most of the work of a request here
# and does the same work for both servers (one recvfrom and one writev per request).
# TAGS and VARY as in hit-path.sh: the fragment's render answer carries TAGS tags; VARY=1
# takes every hit down the full path (no hot answers). DISTRIBUTED=1 counts the
# distributed hit instead: L1 off, every hit read from memcached (scripts/services.sh's,
# on 127.0.0.1:11211). OTEL=1 turns traces on at sample_ratio 1.0, exported to a local
# sink (plain-server, answering every export with an empty 200): every request is then a
# sampled trace (OTEL_RATIO=0.01: one in a hundred), and the count includes the exporter's thread.
#   bash bench/hit-path-instructions.sh [SECONDS] [TAGS] [VARY]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}; tags=${2:-0}; vary=${3:-0}
vary_line=""; [ "$vary" = 1 ] && vary_line='vary = ["header:x-bench"]'
for tool in wrk valgrind; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
done
distributed=""
if [ "${DISTRIBUTED:-0}" = 1 ]; then
  bash scripts/services.sh >/dev/null
  distributed=$(printf '[cache]\ncapacity = "0"\n[store]\nmemcached = ["127.0.0.1:11211"]\nnamespace = "count%s"\n' "$RANDOM")
fi
cargo build --release -q -p tessera-gateway -p tessera-bench
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

# The gateway's upstream, not measured.
target/release/plain-server 127.0.0.1:18091 2048 "$tags" 2>/dev/null & pids+=($!)
otel=""
if [ "${OTEL:-0}" = 1 ]; then
  target/release/plain-server 127.0.0.1:18093 0 2>/dev/null & pids+=($!)
  otel=$(printf '[otel]\nendpoint = "http://127.0.0.1:18093"\nsample_ratio = %s\n' "${OTEL_RATIO:-1.0}")
fi
cat > "$tmp/tessera.toml" <<TOML
[gateway]
listen = "127.0.0.1:18090"
threads = 1
admin_listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:18091"
$distributed
$otel
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
$vary_line
TOML

# Runs the command after NAME and URL under callgrind, sends it requests, prints
# "REQUESTS INSTRUCTIONS_PER_REQUEST".
count() {
  local name=$1 url=$2 pid code n total
  shift 2
  RUST_LOG=warn TOKIO_WORKER_THREADS=1 valgrind -q --tool=callgrind \
    --callgrind-out-file="$tmp/$name.out" "$@" >"$tmp/$name.log" 2>&1 & pid=$!; pids+=("$pid")
  for _ in $(seq 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=20' "$url" || true)
    [ "$code" = 200 ] && break; sleep 0.2
  done
  [ "$code" = 200 ] || { echo "$name never answered 200 (last status $code)" >&2; cat "$tmp/$name.log" >&2; exit 1; }
  wrk -t1 -c8 -d2s "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  n=$(wrk -t1 -c8 -d"${secs}s" "$url" | awk '/requests in/ { print $1 }')
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  total=$(awk '/^(summary|totals):/ { print $2; exit }' "$tmp/$name.out".*)
  echo "$n $((total / n))"
}

read -r pn pi < <(count plain http://127.0.0.1:18092/_render/bench target/release/plain-server 127.0.0.1:18092 2048)
read -r gn gi < <(count gateway http://127.0.0.1:18090/fragments/bench target/release/tessera-gateway --config "$tmp/tessera.toml")
echo "plain hyper server: $pi instructions per request ($pn requests)"
echo "tessera gateway:    $gi instructions per request ($gn requests; tags: $tags, vary: $vary, distributed: ${DISTRIBUTED:-0}, otel: ${OTEL:-0})"
awk -v g="$gi" -v p="$pi" 'BEGIN { printf "gateway/plain: %.2f\n", g / p }'
