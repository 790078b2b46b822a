#!/usr/bin/env bash
# Purge storm: a tag covering HEAVY (default 10000) fragments of one route ("heavy") is
# purged while wrk keeps asking for them and for 200 warm fragments of another route
# ("light"), on a distributed setup on 127.0.0.1: this script's own memcached (a free
# port), the running RabbitMQ (a namespace of its own per run), one gateway, two
# tessera-worker processes of 16 builds each and soak-upstream (20 ms renders, each tagged
# with its route's name; it counts each route's renders answered at once).
#
#   bash bench/purge-storm.sh [SECONDS] [LIMIT] [HEAVY]
#
# Three runs: the heavy route without limits, then with `max_renders = LIMIT` (default
# 4), then with the limit and a soft purge (`?soft=1`). Each: warm every fragment, SECONDS
# of wrk on both routes (before), then the purge and SECONDS of wrk on both routes
# again (storm), during which 20 new light fragments are asked one after the other with
# `Prefer: wait` (the heavy route's wrk runs in the "before" phase too, on warm fragments,
# so both phases load the machine alike). Printed per run: the heavy route's most renders at once at the upstream
# during the storm and how many of its visitors got a 202 placeholder, the light route's
# rate (wrk's requests/s, during over before), hit ratio (hit + stale over all, from the
# gateway's /metrics) and latency before and during, and the time the new light fragments
# took to be built and served.
# PACE_MS=N paces both loads: each of the 16 connections of each waits N ms between
# requests (a steady offered load, as a site's visitors are, rather than closed loops that
# take all the cores they can: with PACE_MS=8, about 2,000 requests/s per loop).
# TESSERA_BENCH_BIN=DIR runs the binaries in DIR instead of building target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; limit=${2:-4}; heavy=${3:-10000}
pace=${PACE_MS:-0}
bash scripts/services.sh >/dev/null
for tool in wrk memcached curl; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
done
bin=${TESSERA_BENCH_BIN:-}
if [[ -z $bin ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
  bin=target/release
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-purge-storm.XXXXXX"); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
me=purge-storm
# shellcheck source=bench/ports.sh
source bench/ports.sh
mc=$(pick_port); up=$(pick_port)
memcached -u "$(id -un)" -l 127.0.0.1 -p "$mc" -m 512 -c 4096 & pids+=($!)
wait_port "$mc" memcached
SOAK_TAGS=1 "$bin"/soak-upstream "127.0.0.1:$up" 20 2048 2>"$tmp/upstream.log" & pids+=($!)
wait_port "$up" soak-upstream

cat >"$tmp/random.lua" <<'LUA'
-- GET {path}?id=N, N uniform in [0, count): set by the script's arguments.
local path, count
local pace = 0
function init(args) path = args[1]; count = tonumber(args[2]); pace = tonumber(args[3] or "0") end
-- PACE_MS > 0: each connection waits that long between requests, so a loop offers a set
-- rate (connections x 1000 / PACE_MS per s) instead of all the machine gives it.
function delay() return pace end
function request() return wrk.format("GET", path .. "?id=" .. math.random(0, count - 1)) end
-- Answers and 202 placeholders, summed over threads when wrk is done.
answered, placeholders = 0, 0
function response(status)
  answered = answered + 1
  if status == 202 then placeholders = placeholders + 1 end
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done()
  local a, p = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("answered"); p = p + t:get("placeholders") end
  io.write(string.format("answers %d placeholders %d\n", a, p))
end
LUA

# hits ADMIN: "hit+stale all" of the light route, from the gateway's /metrics.
hits() {
  curl -sf "$1/metrics" | awk '/^tessera_requests_total\{route="light"/ {
      all += $NF; if ($0 ~ /cache="(hit|stale)"/) hit += $NF } END { print hit + 0, all + 0 }'
}
ratio() { awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" 'BEGIN { printf "%.4f", (c - a) / (d > b ? d - b : 1) }'; }
latency() { grep -E 'Latency |99%' | tr -s ' ' | tr '\n' ' '; }
rate() { awk '/^Requests\/sec:/ { print $2 }'; }

run() { # name max_renders [soft]
  local name=$1 max=$2 soft=${3:+?soft=1} gw adm ns h0 a0 h1 a1 h2 a2 before during peak
  gw=$(pick_port); adm=$(pick_port); ns="storm$$$name$RANDOM"
  cat >"$tmp/$name.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw"
admin_listen = "127.0.0.1:$adm"
[upstream]
url = "http://127.0.0.1:$up"
[store]
memcached = ["127.0.0.1:$mc"]
namespace = "$ns"
[bus]
amqp = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue_expiry = "1m"
[workers]
embedded = 0
concurrency = 16
[[fragment]]
name = "heavy"
render = "/_render/heavy"
params = ["id"]
fresh = "1h"
max_renders = $max
[[fragment]]
name = "light"
render = "/_render/light"
params = ["id"]
fresh = "1h"
TOML
  local own=()
  RUST_LOG=warn "$bin"/tessera-gateway --config "$tmp/$name.toml" >"$tmp/$name.gateway.log" 2>&1 & own+=($!)
  wait_port "$gw" gateway
  for w in 1 2; do
    RUST_LOG=warn "$bin"/tessera-worker --config "$tmp/$name.toml" --admin-listen 127.0.0.1:0 \
      >"$tmp/$name.worker$w.log" 2>&1 & own+=($!)
  done
  pids+=("${own[@]}")
  local base="http://127.0.0.1:$gw/fragments"
  { seq 0 $((heavy - 1)) | sed "s|^|$base/heavy?id=|"; seq 0 199 | sed "s|^|$base/light?id=|"; } |
    xargs -P 32 -I{} curl -s -o /dev/null -H 'Prefer: wait=30' {} || true
  curl -sf "http://127.0.0.1:$up/_peak" >/dev/null   # the count starts afresh
  read -r h0 a0 < <(hits "http://127.0.0.1:$adm")
  # Before: the same two loads, heavy all hits, so "during" differs by the purge alone
  # (on a small machine the two wrk and everything else share the cores).
  wrk -t1 -c16 -d"${secs}s" -s "$tmp/random.lua" "$base/heavy" -- /fragments/heavy "$heavy" "$pace" >/dev/null &
  local heavy_before=$!
  wrk -t1 -c16 -d"${secs}s" --latency -s "$tmp/random.lua" "$base/light" -- /fragments/light 200 "$pace" >"$tmp/$name.before"
  wait "$heavy_before"
  before=$(latency <"$tmp/$name.before")
  read -r h1 a1 < <(hits "http://127.0.0.1:$adm")
  curl -sf -X DELETE "http://127.0.0.1:$adm/tags/heavy$soft" >/dev/null
  wrk -t1 -c16 -d"${secs}s" -s "$tmp/random.lua" "$base/heavy" -- /fragments/heavy "$heavy" "$pace" >"$tmp/$name.heavy" &
  local heavy_wrk=$!
  wrk -t1 -c16 -d"${secs}s" --latency -s "$tmp/random.lua" "$base/light" -- /fragments/light 200 "$pace" >"$tmp/$name.during" &
  local light_wrk=$!
  sleep 1
  local cold=()
  for i in $(seq 1 20); do
    cold+=("$(curl -s -o /dev/null -w '%{time_total}' -H 'Prefer: wait=30' "$base/light?id=new$i")")
  done
  wait "$heavy_wrk" "$light_wrk"
  during=$(latency <"$tmp/$name.during")
  read -r h2 a2 < <(hits "http://127.0.0.1:$adm")
  peak=$(curl -sf "http://127.0.0.1:$up/_peak" | awk '$1 == "heavy" { print $2 }')
  echo "== $name (heavy max_renders = $max${soft:+, soft purge})"
  echo "heavy: most renders at once at the upstream during the storm: ${peak:-0}"
  echo "heavy visitors during the storm: $(grep '^answers' "$tmp/$name.heavy")"
  awk -v b="$(rate <"$tmp/$name.before")" -v d="$(rate <"$tmp/$name.during")" \
    'BEGIN { printf "light rate: before %.0f/s, during %.0f/s: %.2fx\n", b, d, d / b }'
  echo "light hit ratio: before $(ratio "$h0" "$a0" "$h1" "$a1"), during $(ratio "$h1" "$a1" "$h2" "$a2")"
  echo "light wrk before: $before"
  echo "light wrk during: $during"
  printf '%s\n' "${cold[@]}" | sort -n | awk '{ t[NR] = $1 } END {
    printf "20 new light fragments with Prefer: wait during the storm: median %.3f s, max %.3f s\n", t[int((NR + 1) / 2)], t[NR] }'
  kill "${own[@]}" 2>/dev/null || true
  wait "${own[@]}" 2>/dev/null || true
}

echo "== purge storm: $heavy heavy fragments (20 ms renders), 2 workers x 16, wrk -c16 ${secs} s per phase, pace ${pace} ms"
run unlimited 0
run limited "$limit"
run soft "$limit" soft
