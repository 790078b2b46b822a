#!/usr/bin/env bash
# Soak: SECONDS (default 600) of mixed load on a distributed setup, all on 127.0.0.1:
# this script's own memcached (a free port, never the shared 11211), the running RabbitMQ
# (its own namespace and queue, dropped by RabbitMQ a minute after the run), one gateway,
# two tessera-worker processes and soak-upstream, which records every render.
#
#   bash bench/soak.sh [SECONDS]
#
# soak-driver sends, at bounded rates: hits on 50 warm fragments, cold misses, long-polls
# (Prefer: wait), ESI pages and purges (admin API). Along the way, at fixed fractions of
# SECONDS: worker 1 is killed (SIGKILL) and restarted (30 %), memcached is restarted
# (55 %), worker 2 is stopped (SIGTERM) and restarted (75 %).
#
# Printed: RSS and open file descriptors of the gateway and of each worker, sampled from
# /proc every 5 s (all samples in the CSV named at the end); per kind of request the
# answers by status; lost builds (accepted by the gateway, never rendered: expect 0) and
# doubled builds (rendered twice without a fault in between to explain it: expect 0), each
# lost key with when it was sent and accepted, beside the faults.
# Workers log each build at info (key, request id, attempt) to explain a doubled one, and
# each request dropped without a build with its reason, to explain a lost one.
# TESSERA_BENCH_BIN=DIR runs the binaries in DIR instead of building target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
(( secs >= 30 )) || { echo "soak: SECONDS must be at least 30" >&2; exit 2; }

bash scripts/services.sh >/dev/null   # RabbitMQ (started only when down; never restarted)
command -v memcached >/dev/null || { apt-get update -qq && apt-get install -y -qq memcached >/dev/null; }
bin=${TESSERA_BENCH_BIN:-}   # a directory of binaries already built: no cargo build
if [[ -z $bin ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
  bin=target/release
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-soak.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}" $(cat "$tmp"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

me=soak
# shellcheck source=bench/ports.sh
source bench/ports.sh
fault() { echo "$1 $(date +%s%3N)" >>"$tmp/faults"; echo "== $(date +%T) $1"; }

mc=$(pick_port); up=$(pick_port); gw=$(pick_port); adm=$(pick_port)
ns="soak$$r$RANDOM"
start_memcached() {
  nice -n 10 memcached -u "$(id -un)" -l 127.0.0.1 -p "$mc" -m 256 -c 4096 &
  echo $! >"$tmp/memcached.pid"
  wait_port "$mc" memcached
}
start_worker() { # number
  RUST_LOG=warn,tessera_workers=info nice -n 10 "$bin"/tessera-worker --config "$tmp/soak.toml" \
    --admin-listen 127.0.0.1:0 >>"$tmp/worker$1.log" 2>&1 &
  echo $! >"$tmp/worker$1.pid"
}

cat >"$tmp/soak.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw"
admin_listen = "127.0.0.1:$adm"
max_wait = "10s"
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
concurrency = 8
TOML
for route in hot cold poll esi purge; do
  printf '[[fragment]]\nname = "%s"\nrender = "/_render/%s"\nparams = ["id"]\nfresh = "1h"\nbuild_timeout = "5s"\nqueue = "%s.build"\n' \
    "$route" "$route" "$ns" >>"$tmp/soak.toml"
done

start_memcached
nice -n 10 "$bin"/soak-upstream "127.0.0.1:$up" 20 2048 2>"$tmp/upstream.log" & pids+=($!)
RUST_LOG=warn nice -n 10 "$bin"/tessera-gateway --config "$tmp/soak.toml" >"$tmp/gateway.log" 2>&1 &
gateway_pid=$!; pids+=("$gateway_pid")
wait_port "$up" soak-upstream; wait_port "$gw" gateway
start_worker 1; start_worker 2

# RSS (kB) and open descriptors of each process every 5 s, until told to stop.
echo "seconds,process,rss_kb,fds" >"$tmp/samples.csv"
sample() {
  local t0=$SECONDS name pid
  for _ in $(seq $((secs / 5 + 60))); do
    [[ -e $tmp/stop ]] && return
    for name in gateway worker1 worker2; do
      if [[ $name == gateway ]]; then pid=$gateway_pid; else pid=$(cat "$tmp/$name.pid"); fi
      [[ -r /proc/$pid/status ]] || continue
      echo "$((SECONDS - t0)),$name,$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status"),$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    done >>"$tmp/samples.csv"
    sleep 5
  done
}
sample & pids+=($!)

echo "== soak for $secs s: namespace $ns, memcached 127.0.0.1:$mc, gateway 127.0.0.1:$gw"
nice -n 10 "$bin"/soak-driver soak "http://127.0.0.1:$gw" "http://127.0.0.1:$adm" \
  "http://127.0.0.1:$up" "$secs" "$tmp/faults" >"$tmp/driver.out" 2>&1 &
driver=$!; pids+=("$driver")

sleep $((secs * 30 / 100))
fault worker-killed; kill -KILL "$(cat "$tmp/worker1.pid")"; sleep 3; start_worker 1
sleep $((secs * 25 / 100 - 3))
fault memcached-down; kill "$(cat "$tmp/memcached.pid")"; sleep 3
start_memcached; fault memcached-up
sleep $((secs * 20 / 100 - 3))
fault worker-stopped; kill -TERM "$(cat "$tmp/worker2.pid")"
for _ in $(seq 200); do kill -0 "$(cat "$tmp/worker2.pid")" 2>/dev/null || break; sleep 0.1; done
start_worker 2
wait "$driver" || true
touch "$tmp/stop"

cat "$tmp/driver.out"
echo "== RSS (MB) and open descriptors: first sample, after warm-up ($((secs / 5)) s), end, max"
awk -F, -v warm=$((secs / 5)) 'NR > 1 {
    p = $2; if (!(p in first)) { first[p] = $3; ffd[p] = $4 }
    if ($1 >= warm && !(p in atwarm)) atwarm[p] = $3
    last[p] = $3; lfd[p] = $4; if ($3 > max[p]) max[p] = $3; if ($4 > mfd[p]) mfd[p] = $4
  } END { for (p in first) printf "%-8s rss %6.1f %6.1f %6.1f max %6.1f   fds %d -> %d (max %d)\n",
    p, first[p] / 1024, atwarm[p] / 1024, last[p] / 1024, max[p] / 1024, ffd[p], lfd[p], mfd[p] }' \
  "$tmp/samples.csv" | sort
echo "== samples: $tmp/samples.csv; logs: $tmp/*.log"
