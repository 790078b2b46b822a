#!/usr/bin/env bash
# Memory after a burst: an embedded gateway with a 64 MiB store (store.memory_capacity)
# and a 16 MiB L1 (cache.capacity) builds KEYS distinct 2 KB fragments (default 80000,
# about 160 MB of fragments: both budgets fill and evict), then KEYS more (a second burst
# must not grow RSS: bounded, not leaking), then sits idle for IDLE seconds (default 60).
# Its RSS is sampled from /proc every 5 s and printed at the end: the figure to hold
# against the budgets (80 MiB) plus the stated overhead (README, "Memory").
#
#   bash bench/memory.sh [KEYS] [IDLE]
#
# TESSERA_BENCH_BIN=DIR runs the binaries in DIR instead of building target/release.
# Environment passed to the gateway (e.g. MALLOC_ARENA_MAX=2) changes its allocator's
# behaviour, to compare settings without a rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-80000}; idle=${2:-60}
bin=${TESSERA_BENCH_BIN:-}   # a directory of binaries already built: no cargo build
if [[ -z $bin ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
  bin=target/release
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-memory.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

me=memory
# shellcheck source=bench/ports.sh
source bench/ports.sh
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

up=$(pick_port); gw=$(pick_port); adm=$(pick_port)
cat >"$tmp/memory.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw"
admin_listen = "127.0.0.1:$adm"
[upstream]
url = "http://127.0.0.1:$up"
[cache]
capacity = "16MiB"
[store]
memory_capacity = "64MiB"
[workers]
embedded = 4
[[fragment]]
name = "burst"
render = "/_render/burst"
params = ["id"]
fresh = "1h"
TOML
nice -n 10 "$bin"/soak-upstream "127.0.0.1:$up" 0 2048 2>/dev/null & pids+=($!)
RUST_LOG=warn nice -n 10 "$bin"/tessera-gateway --config "$tmp/memory.toml" >"$tmp/gateway.log" 2>&1 &
gateway=$!; pids+=("$gateway")
wait_port "$up" soak-upstream; wait_port "$gw" gateway
echo "== gateway idle at start: $(rss_mb "$gateway") MB"

(
  t0=$SECONDS
  for _ in $(seq 2000); do
    echo "$((SECONDS - t0)) $(rss_mb "$gateway")" 2>/dev/null || exit 0
    sleep 5
  done
) >"$tmp/rss.txt" & pids+=($!)

nice -n 10 "$bin"/soak-driver burst "http://127.0.0.1:$gw" "$keys" 64
echo "== after the burst: $(rss_mb "$gateway") MB"
nice -n 10 "$bin"/soak-driver burst "http://127.0.0.1:$gw" "$keys" 64 "$keys"
echo "== after a second burst of new keys: $(rss_mb "$gateway") MB"
curl -s "http://127.0.0.1:$adm/metrics" | grep -E '^tessera_l1_(bytes|entries)' || true
sleep "$idle"
echo "== after $idle s idle: $(rss_mb "$gateway") MB (budgets: 64 MiB store + 16 MiB L1)"
echo "== RSS (seconds MB) every 5 s:"
tr '\n' ' ' <"$tmp/rss.txt"; echo
