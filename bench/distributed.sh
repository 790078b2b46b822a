#!/usr/bin/env bash
# Distributed mode side by side with what a user would pick instead, in one run, on one
# memcached (this script's own, `-t 2`, on a free port) and the running RabbitMQ:
#   1. memcached hits with L1 off: the gateway against nginx `memcached_pass` (Debian's
#      nginx, 2 workers, keepalive 32), both reading a 2 KB fragment, wrk -t1 -c64, with
#      each server's and memcached's CPU per request, in HIT_ROUNDS (5) alternating
#      rounds, and the median of the rounds' ratios;
#   2. cold misses (every request a new key: lookup, lease with re-check, confirmed
#      publish, 202) against RabbitMQ's own publish+confirm rate and publish-to-confirm
#      time with 64 in flight (amqp-rates, as many messages as a round publishes), on
#      classic and on quorum queues; miss traffic starts once the gateway is ready, and
#      each round on an empty build queue, each with its ratio to RabbitMQ's own rate;
#   3. one, two and four tessera-worker processes draining queued builds (instant
#      upstream with 16 and with 64 builds in flight per process, then 50 ms renders)
#      against RabbitMQ's own consume+ack rate with prefetch 64.
# LAYOUTS lists the gateways' `gateway.threads` to compare in 1 and 2 (`default`, or a
# number; default "default"); PARTS picks the parts (default "1 2 3").
#   bash bench/distributed.sh [SECONDS] [BUILDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; builds=${2:-4000}
bash scripts/services.sh >/dev/null
for tool in wrk nginx memcached; do
  command -v "$tool" >/dev/null || command -v "/usr/sbin/$tool" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
done
systemctl stop nginx 2>/dev/null || true   # the package's own instance, if it started one
nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
bin=target/release
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-distributed.XXXXXX"); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
me=distributed
# shellcheck source=bench/ports.sh
source bench/ports.sh
mc=$(pick_port); up=$(pick_port); ng=$(pick_port)
gw2=$(pick_port); adm2=$(pick_port)

memcached -u "$(id -un)" -l 127.0.0.1 -p "$mc" -t 2 -m 256 -c 4096 & pids+=($!); mcpid=$!
wait_port "$mc" memcached
$bin/plain-server "127.0.0.1:$up" 2048 2>/dev/null & pids+=($!)
wait_port "$up" plain-server

# nginx reads a raw 2 KB value; the gateway reads its envelope of the same fragment.
exec 3<>"/dev/tcp/127.0.0.1/$mc"
printf 'set bench:nginx 0 0 2048\r\n%s\r\n' "$(head -c 2048 /dev/zero | tr '\0' x)" >&3
read -r stored <&3; exec 3>&-
[[ $stored == STORED* ]] || { echo "distributed: could not seed memcached: $stored" >&2; exit 1; }
cat >"$tmp/nginx.conf" <<NGINX
worker_processes 2;
pid $tmp/nginx.pid;
error_log $tmp/nginx.error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream memcached { server 127.0.0.1:$mc; keepalive 32; }
  server {
    listen 127.0.0.1:$ng;
    location /fragment {
      set \$memcached_key "bench:nginx";
      memcached_pass memcached;
      default_type text/html;
    }
  }
}
NGINX
nginx -c "$tmp/nginx.conf" -p "$tmp" -g 'daemon off;' & pids+=($!); ngpid=$!
wait_port "$ng" nginx

ns="bench$RANDOM"
layouts=${LAYOUTS:-default}; parts=${PARTS:-1 2 3}
part() { [[ " $parts " == *" $1 "* ]]; }
# threads_line LAYOUT: the `gateway.threads` line of a layout (`default`: none).
threads_line() { [[ $1 == default ]] || echo "threads = $1"; }
gws=(); gwpids=()
for layout in $layouts; do
  part 1 || break
  port=$(pick_port); admin=$(pick_port)
  cat >"$tmp/hit-$layout.toml" <<TOML
[gateway]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
$(threads_line "$layout")
[upstream]
url = "http://127.0.0.1:$up"
[cache]
capacity = "0"
[store]
memcached = ["127.0.0.1:$mc"]
namespace = "$ns"
[workers]
embedded = 2
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
TOML
  RUST_LOG=warn $bin/tessera-gateway --config "$tmp/hit-$layout.toml" & pids+=($!); gwpids+=($!)
  wait_port "$port" gateway
  curl -sf -o /dev/null -H 'Prefer: wait=5' "http://127.0.0.1:$port/fragments/bench"
  gws+=("$port")
done
summary() { grep -E 'Requests/sec|Latency |99%' | tr -s ' ' | tr '\n' ' '; echo; }
if part 1; then
echo "== 1. memcached hits, L1 off, 2 KB, wrk -t1 -c64, ${secs} s each, alternating (layouts: $layouts)"
# CPU time (clock ticks) of processes, from /proc, and per request as µs: steadier than
# throughput on a machine whose load swings, since it does not count what others ran.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
hz=$(getconf CLK_TCK)
# run_hits NAME URL PIDS...: a wrk round, then the CPU per request of PIDS and of memcached.
run_hits() {
  local name=$1 url=$2; shift 2
  local own0 mc0 out own1 mc1 n
  own0=$(ticks "$@"); mc0=$(ticks "$mcpid")
  out=$(wrk -t1 -c64 -d"${secs}s" --latency "$url")
  own1=$(ticks "$@"); mc1=$(ticks "$mcpid")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  echo "$name $(summary <<<"$out")CPU per request: own $(( (own1 - own0) * 1000000 / hz / n )) µs, memcached $(( (mc1 - mc0) * 1000000 / hz / n )) µs"
}
# Throughput on two cores shared by wrk, the server and memcached swings by 15 % from one
# round to the next, for either server: the target is read off the median of the rounds'
# ratios (the lower of the two middle ones for an even HIT_ROUNDS), each round of a
# gateway against the nginx round just before it.
declare -A ratios=()
for run in $(seq "${HIT_ROUNDS:-5}"); do
  # nginx's CPU is its workers'.
  run_hits "run $run nginx memcached_pass:" "http://127.0.0.1:$ng/fragment" $(pgrep -P "$ngpid")
  nginx_rate=$rate
  i=0
  for layout in $layouts; do
    run_hits "run $run tessera gateway ($layout):" "http://127.0.0.1:${gws[$i]}/fragments/bench" "${gwpids[$i]}"
    ratios[$layout]+="$(awk -v g="$rate" -v n="$nginx_rate" 'BEGIN {printf "%.2f", g / n}') "
    i=$((i + 1))
  done
done
for layout in $layouts; do
  # shellcheck disable=SC2086 # one ratio a word
  echo "gateway ($layout) / nginx, round by round: ${ratios[$layout]}; median $(printf '%s\n' ${ratios[$layout]} | sort -n | awk '{r[NR] = $1} END {print r[int((NR + 1) / 2)]}')x"
done
echo "== 1b. the same, one connection (what batching costs a lone request)"
echo "nginx memcached_pass: $(wrk -t1 -c1 -d"${secs}s" --latency "http://127.0.0.1:$ng/fragment" | summary)"
echo "tessera gateway (${layouts%% *}): $(wrk -t1 -c1 -d"${secs}s" --latency "http://127.0.0.1:${gws[0]}/fragments/bench" | summary)"
for p in "${gwpids[@]}"; do kill "$p"; done
fi

# Ids unique across rounds: wrk seeds math.random the same way every run, so a round
# that reused the ids of the one before would find their leases still held (202 without
# a publish) and measure no misses at all.
miss_script() {
  cat >"$tmp/miss.lua" <<LUA
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/fragments/cold?id=$1-" .. counter)
end
LUA
}
if part 2; then
echo "== 2. cold misses (a new key each: lookup, lease with re-check, confirmed publish, 202), wrk -t1 -c64"
for kind in classic quorum; do
  # As many messages as one round of misses publishes (about 6,000 a second): a queue
  # tens of thousands deep confirms slower than a short one (on classic queues, p99
  # 25 ms at 20,000 messages, 43 ms at 60,000).
  broker=$($bin/amqp-rates "$((secs * 6000))" 64 "$kind" | grep publish)
  echo "$broker"
  broker_rate=$(grep -oE '[0-9]+ msg/s' <<<"$broker" | cut -d' ' -f1)
  # The default (an HTTP thread per core), then the public listener on the shared
  # runtime (gateway.threads = 0), which keeps the tail shorter beside a busy broker.
  for threads in $layouts; do
    ns_miss="${ns}$kind$threads"
    cat >"$tmp/miss-$kind.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw2"
admin_listen = "127.0.0.1:$adm2"
$(threads_line "$threads")
[upstream]
url = "http://127.0.0.1:$up"
[store]
memcached = ["127.0.0.1:$mc"]
namespace = "$ns_miss"
[bus]
amqp = "amqp://guest:guest@127.0.0.1:5672/%2f"
# Publishing is no use of a queue to RabbitMQ: with no worker consuming, a queue expires
# this long after its declaration, and a publish that meets the deletion can crash the
# broker's channel (541 INTERNAL_ERROR, seen with 1m and 8 s rounds). Beyond any run.
queue_expiry = "10m"
queue_type = "$kind"
[workers]
embedded = 0
[[fragment]]
name = "cold"
render = "/_render/cold"
params = ["id"]
TOML
    RUST_LOG=warn $bin/tessera-gateway --config "$tmp/miss-$kind.toml" & miss=$!; pids+=("$miss")
    wait_port "$adm2" gateway
    # Traffic starts once the gateway says it is ready, as a load balancer would send it.
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$adm2/readyz" && break; sleep 0.1; done
    curl -sf -o /dev/null "http://127.0.0.1:$adm2/readyz" ||
      echo "distributed: the $kind gateway (threads $threads) is not ready after 10 s; measuring it anyway" >&2
    for run in 1 2 3; do
      miss_script "$kind$run$RANDOM"
      out=$(wrk -t1 -c64 -d"${secs}s" --latency -s "$tmp/miss.lua" "http://127.0.0.1:$gw2")
      echo "run $run tessera gateway, $kind queue, threads $threads: $(summary <<<"$out")$(awk -v b="$broker_rate" '/Requests\/sec/ {printf "%.2fx RabbitMQ", $2 / b}' <<<"$out")"
      # Each round starts on an empty queue, as RabbitMQ's own rate above does: a round
      # leaves some 100,000 builds queued (no worker runs), and a deeper queue confirms
      # slower, so later rounds would measure the depth the earlier ones left.
      if command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q purge_queue "$ns_miss.build" >/dev/null ||
          echo "distributed: could not purge $ns_miss.build; the next round starts on it" >&2
      fi
    done
    kill "$miss"; wait "$miss" 2>/dev/null || true
    # Left alone, the queue would expire ten minutes later, and the broker might delete
    # it during a later measurement.
    if command -v rabbitmqctl >/dev/null; then
      rabbitmqctl -q delete_queue "$ns_miss.build" >/dev/null ||
        echo "distributed: could not delete $ns_miss.build; it expires within ten minutes" >&2
    fi
  done
done

fi

part 3 || exit 0
echo "== 3. queued builds drained by tessera-worker processes"
$bin/amqp-rates "$builds" 64 | grep consume
$bin/build-throughput $bin "$builds" 0 16 1 2 4
$bin/build-throughput $bin "$builds" 0 64 1 2
$bin/build-throughput $bin "$((builds / 4))" 50 16 1 2 4
