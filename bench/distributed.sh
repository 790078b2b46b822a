#!/usr/bin/env bash
# Distributed-mode figures (memcached + RabbitMQ on this machine):
#   1. builds/s with 1, 2 and 4 tessera-worker processes, for an upstream that answers at
#      once (per-build overhead; compare with the raw consume+ack rate printed first) and
#      for one that takes 50 ms per render (should scale with processes);
#   2. memcached-hit throughput of a gateway with L1 disabled (wrk);
#   3. cold-miss placeholder latency p50/p99 (wrk, every request a new key).
#   bash bench/distributed.sh [BUILDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
builds=${1:-2000}; secs=${2:-10}
bash scripts/services.sh >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
bin=target/release
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

echo "== build throughput, instant upstream ($builds builds)"
$bin/build-throughput $bin "$builds" 0 1 2 4
echo "== build throughput, 50 ms renders ($((builds / 2)) builds)"
$bin/build-throughput $bin "$((builds / 2))" 50 1 2 4

$bin/plain-server 127.0.0.1:18081 2048 2>/dev/null & pids+=($!)
ns="bench$RANDOM"
cat > "$tmp/l2.toml" <<TOML
[gateway]
listen = "127.0.0.1:18082"
admin_listen = "127.0.0.1:19082"
[upstream]
url = "http://127.0.0.1:18081"
[cache]
capacity = "0"
[store]
memcached = ["127.0.0.1:11211"]
namespace = "$ns"
[workers]
embedded = 2
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
TOML
RUST_LOG=warn $bin/tessera-gateway --config "$tmp/l2.toml" & pids+=($!)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' http://127.0.0.1:18082/fragments/bench || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
echo "== memcached hits, L1 disabled (2 KB fragment, ${secs}s)"
wrk -t1 -c64 -d"${secs}s" --latency http://127.0.0.1:18082/fragments/bench | grep -E 'Requests/sec|Latency|50%|99%'

cat > "$tmp/miss.toml" <<TOML
[gateway]
listen = "127.0.0.1:18083"
admin_listen = "127.0.0.1:19083"
[upstream]
url = "http://127.0.0.1:18081"
[store]
memcached = ["127.0.0.1:11211"]
namespace = "${ns}m"
[bus]
amqp = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue_expiry = "1m"
[workers]
embedded = 0
[[fragment]]
name = "cold"
render = "/_render/cold"
params = ["id"]
queue = "${ns}m.build"
TOML
RUST_LOG=warn $bin/tessera-gateway --config "$tmp/miss.toml" & pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19083/healthz && break; sleep 0.1; done
cat > "$tmp/miss.lua" <<'LUA'
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/fragments/cold?id=" .. math.random(1, 2000000000) .. "-" .. counter)
end
LUA
echo "== cold misses: lease add + confirmed publish + 202 (every request a new key, ${secs}s)"
wrk -t1 -c16 -d"${secs}s" --latency -s "$tmp/miss.lua" http://127.0.0.1:18083 | grep -E 'Requests/sec|Latency|50%|99%'
curl -s "http://127.0.0.1:19083/api/status" | head -c 300; echo
