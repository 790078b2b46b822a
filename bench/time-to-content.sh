#!/usr/bin/env bash
# Time to content (issue 34 part 4): one client asks a cold fragment (a new `?id=` each
# time) with `Prefer: wait=5` and waits for its 200 and body, one request at a time, the
# upstream rendering at once (plain-server, 2 KB). Measured by `time-to-content`, a
# keep-alive client (curl's own start-up would be most of the figure), on two setups
# running side by side, in ROUNDS (default 10) alternating blocks:
#   embedded: a gateway alone (`[workers] embedded` at its default, no [store], no [bus]);
#   amqp:     this script's own memcached on a free port, the running RabbitMQ in a fresh
#             namespace (`bus.queue_expiry`), a gateway with `embedded = 0` and one
#             tessera-worker process.
# Prints p50, p90, p99 and the largest of each, and p90 against the goals (1 ms embedded,
# 2 ms over AMQP).
# QUEUE_TYPE=classic|quorum sets `bus.queue_type` (default: unset, so classic).
# BASE=DIR also runs both setups from the binaries in DIR (an earlier build) in the same
# rounds, as embedded-base and amqp-base.
#   bash bench/time-to-content.sh [REQUESTS]     (default 2000 per setup)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}; rounds=${ROUNDS:-10}
bash scripts/services.sh >/dev/null
command -v memcached >/dev/null || command -v /usr/sbin/memcached >/dev/null ||
  { apt-get update -qq && apt-get install -y -qq memcached >/dev/null; }
nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
bin=target/release
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-ttc.XXXXXX"); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
me=time-to-content
# shellcheck source=bench/ports.sh
source bench/ports.sh
up=$(pick_port); mc=$(pick_port)
memcached -u "$(id -un)" -l 127.0.0.1 -p "$mc" -t 2 -m 256 & pids+=($!)
wait_port "$mc" memcached
$bin/plain-server "127.0.0.1:$up" 2048 2>/dev/null & pids+=($!)
wait_port "$up" plain-server

targets=()
# setups SUFFIX DIR: the two setups of the binaries in DIR, as targets embeddedSUFFIX
# and amqpSUFFIX.
setups() {
  local sfx=$1 dir=$2 emb emb_admin amqp amqp_admin route admin
  emb=$(pick_port); emb_admin=$(pick_port); amqp=$(pick_port); amqp_admin=$(pick_port)
  route='[[fragment]]
name = "cold"
render = "/_render/cold"
params = ["id"]'
  cat >"$tmp/embedded$sfx.toml" <<TOML
[gateway]
listen = "127.0.0.1:$emb"
admin_listen = "127.0.0.1:$emb_admin"
[upstream]
url = "http://127.0.0.1:$up"
$route
TOML
  cat >"$tmp/amqp$sfx.toml" <<TOML
[gateway]
listen = "127.0.0.1:$amqp"
admin_listen = "127.0.0.1:$amqp_admin"
[upstream]
url = "http://127.0.0.1:$up"
[store]
memcached = ["127.0.0.1:$mc"]
namespace = "ttc${sfx#-}$RANDOM"
[bus]
amqp = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue_expiry = "1m"
${QUEUE_TYPE:+queue_type = \"$QUEUE_TYPE\"}
[workers]
embedded = 0
$route
TOML
  RUST_LOG=${RUST_LOG:-warn} "$dir/tessera-gateway" --config "$tmp/embedded$sfx.toml" & pids+=($!)
  RUST_LOG=${RUST_LOG:-warn} "$dir/tessera-gateway" --config "$tmp/amqp$sfx.toml" & pids+=($!)
  RUST_LOG=${RUST_LOG:-warn} "$dir/tessera-worker" --config "$tmp/amqp$sfx.toml" --admin-listen 127.0.0.1:0 & pids+=($!)
  for admin in "$emb_admin" "$amqp_admin"; do
    wait_port "$admin" gateway
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$admin/readyz" && break; sleep 0.1; done
  done
  targets+=("embedded$sfx=http://127.0.0.1:$emb/fragments/cold" "amqp$sfx=http://127.0.0.1:$amqp/fragments/cold")
}
setups "" "$bin"
# BASE=DIR: the same two setups of the binaries in DIR too (an earlier build), in the
# same alternating rounds, as embedded-base and amqp-base.
[[ -z ${BASE:-} ]] || setups -base "$BASE"

echo "== time to content: cold 2 KB fragment, Prefer: wait=5, sequential, $n requests each in $rounds alternating rounds"
out=$($bin/time-to-content "$n" "$rounds" "${targets[@]}")
echo "$out"
# p90 against the goals: at most 1 ms embedded, 2 ms over AMQP.
awk '{for (i = 1; i < NF; i++) if ($i == "p90") p90[$1] = $(i + 1)}
  END {printf "p90 / goal: embedded %.2f (goal 1 ms), amqp %.2f (goal 2 ms)\n", p90["embedded:"] / 1, p90["amqp:"] / 2}' <<<"$out"
