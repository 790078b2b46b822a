#!/usr/bin/env bash
# Hit path: wrk against the gateway serving a cached 2 KB fragment, and against a minimal
# hyper server returning the same 2 KB, in the same run. Prints both rates and the ratio.
#   bash bench/hit-path.sh [DURATION_SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; conns=${2:-64}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p tessera-gateway -p tessera-bench
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

target/release/plain-server 127.0.0.1:18081 2048 2>/dev/null & pids+=($!)
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
RUST_LOG=warn target/release/tessera-gateway --config "$tmp/tessera.toml" & pids+=($!)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' http://127.0.0.1:18080/fragments/bench || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "gateway never served the fragment (last status $code)"; exit 1; }
size=$(curl -s http://127.0.0.1:18080/fragments/bench | wc -c)
echo "fragment size: $size bytes"

rate() { wrk -t1 -c"$conns" -d"${secs}s" --latency "$1" | tee /dev/stderr | awk '/Requests\/sec/ {print $2}'; }
wrk -t1 -c"$conns" -d2s http://127.0.0.1:18081/_render/bench >/dev/null   # warm-up
wrk -t1 -c"$conns" -d2s http://127.0.0.1:18080/fragments/bench >/dev/null
plain=$(rate http://127.0.0.1:18081/_render/bench 2>"$tmp/plain.txt")
gateway=$(rate http://127.0.0.1:18080/fragments/bench 2>"$tmp/gw.txt")
grep -E 'Latency|99%' "$tmp/plain.txt" | sed 's/^/plain   /'
grep -E 'Latency|99%' "$tmp/gw.txt" | sed 's/^/gateway /'
echo "plain hyper server: $plain req/s"
echo "tessera gateway:    $gateway req/s"
awk -v g="$gateway" -v p="$plain" 'BEGIN { printf "ratio gateway/plain: %.2f\n", g / p }'
