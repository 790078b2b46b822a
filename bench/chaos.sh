#!/usr/bin/env bash
# Chaos: mixed load on a cluster of 3 memcached servers, 3 RabbitMQ nodes (quorum queues),
# 2 gateways and 2 tessera-worker processes, all on 127.0.0.1, while each node is killed
# and brought back in turn. Run as root (the RabbitMQ nodes run as the rabbitmq user).
#
#   bash bench/chaos.sh
#
# Phases (lengths in seconds: BASE, DOWN, AFTER, environment variables):
#   baseline (BASE, 40), all up;
#   memcached-N-killed, N = 1..3: SIGKILL, DOWN (20) s, restarted on its port, AFTER (15) s;
#   memcached-2-hung: SIGSTOP, DOWN s, SIGCONT, AFTER s;
#   rabbitmq-N-killed, N = 1..3: the node's Erlang VM killed (SIGKILL), DOWN s, started
#     again (`scripts/rabbitmq-cluster.sh up --no-wait`), AFTER s once it takes AMQP
#     connections (so a majority of every quorum queue is up before the next kill);
#   worker-killed: worker 1 killed (SIGKILL), restarted 10 s later, AFTER s;
#   gateway-killed: gateway 2 killed (SIGKILL), restarted 10 s later, AFTER s.
# PHASES="memcached hang rabbitmq worker gateway" (the default) picks which fault phases
# run; FLUSH_ON_RETURN=false sets `store.flush_on_return = false`, to see the stale count
# catch what a returning memcached still holds.
# About 6.5 minutes in all. Gateway 1 and worker 1 list the RabbitMQ nodes from node 1,
# gateway 2 and worker 2 from node 2, so killing node 1 or 2 takes away the node some of
# them are connected to. soak-driver (`chaos`) sends about 600 requests a second to the
# two gateways in turn: hits on 50 built fragments, cold misses, long-polls, ESI pages,
# purges with reads of the purged fragments; soak-upstream (20 ms renders) records every
# render. At the end it prints one table row per phase: 503s, requests with no answer,
# lost builds, doubled builds (at once / later), seconds until misses are answered
# normally again, hit rate against the baseline, hit p99, stale answers after a node
# returns (see bench/src/bin/soak-driver/chaos.rs for each definition).
#
# It kills nodes of scripts/rabbitmq-cluster.sh's cluster, which tests share: run it when
# no test uses that cluster.
#
# Installs memcached, rabbitmq-server and jq from Debian's packages when missing. Starts
# the RabbitMQ cluster when it is not running and leaves it running (other runs and the
# tests use it) unless this script started all of it: then it is stopped at the end
# (TESSERA_CHAOS_KEEP_RABBITMQ=1 keeps it). On exit, Ctrl-C included, it stops every
# process it started, by pid, continues a stopped memcached, and starts again a RabbitMQ
# node it killed. TESSERA_BENCH_BIN=DIR runs the binaries in DIR instead of building
# target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-40}; DOWN=${DOWN:-20}; AFTER=${AFTER:-15}
PHASES=${PHASES:-memcached hang rabbitmq worker gateway}   # a subset, for a quick look
FLUSH_ON_RETURN=${FLUSH_ON_RETURN:-true}   # false: see the stale count catch a returning node
[[ $(id -u) == 0 ]] || { echo "chaos: run it as root (RabbitMQ nodes run as the rabbitmq user)" >&2; exit 2; }

missing=()
command -v memcached >/dev/null || missing+=(memcached)
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || missing+=(rabbitmq-server)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
bin=${TESSERA_BENCH_BIN:-}
if [[ -z $bin ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers -p tessera-bench
  bin=target/release
fi

rq=scripts/rabbitmq-cluster.sh
rq_running() { bash "$rq" status 2>/dev/null | awk '$3 ~ /^[0-9]+$/' | wc -l; }
rq_pid() { bash "$rq" status | awk -v n="tessera-rq$1@localhost" '$1 == n && $3 ~ /^[0-9]+$/ {print $3}'; }
rq_was=$(rq_running)
bash "$rq" up --nodes 3 >/dev/null
IFS=, read -r -a nodes <<<"$(bash "$rq" urls)"
amqp_from() { # first node (1-based): the URLs from that node on, round
  local i out=()
  for i in 0 1 2; do out+=("${nodes[$(((i + $1 - 1) % 3))]}"); done
  (IFS=,; echo "${out[*]}")
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-chaos.XXXXXX")
declare -A pid   # what runs now, by name: memcached1..3, upstream, gateway1..2, worker1..2, driver
rq_killed=0
cleanup() {
  local name
  [[ -z ${pid[memcached2]:-} ]] || kill -CONT "${pid[memcached2]}" 2>/dev/null || true
  for name in "${!pid[@]}"; do kill "${pid[$name]}" 2>/dev/null || true; done
  if ((rq_killed)) && (($(rq_running) < 3)); then
    echo "== starting again the RabbitMQ node this run killed"
    bash "$rq" up --nodes 3 --no-wait >/dev/null || true
  fi
  if ((rq_was == 0)) && [[ ${TESSERA_CHAOS_KEEP_RABBITMQ:-0} != 1 ]]; then
    echo "== stopping the RabbitMQ cluster this run started"
    bash "$rq" down >/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

me=chaos
# shellcheck source=bench/ports.sh
source bench/ports.sh
mark() { echo "$1 $(date +%s%3N)" >>"$tmp/marks"; echo "== $(date +%T) $1"; }

declare -A mc_port
for i in 1 2 3; do mc_port[$i]=$(pick_port); done
up=$(pick_port); gw1=$(pick_port); adm1=$(pick_port); gw2=$(pick_port); adm2=$(pick_port)
ns="chaos$$r$RANDOM"
cat >"$tmp/chaos.toml" <<TOML
[gateway]
max_wait = "10s"
[upstream]
url = "http://127.0.0.1:$up"
[store]
memcached = ["127.0.0.1:${mc_port[1]}", "127.0.0.1:${mc_port[2]}", "127.0.0.1:${mc_port[3]}"]
namespace = "$ns"
flush_on_return = $FLUSH_ON_RETURN
[bus]
amqp = "${nodes[0]}"
queue_type = "quorum"
queue_expiry = "1m"
[workers]
embedded = 0
concurrency = 8
TOML
for route in hot cold poll esi purge; do
  printf '[[fragment]]\nname = "%s"\nrender = "/_render/%s"\nparams = ["id"]\nfresh = "1h"\nbuild_timeout = "5s"\nqueue = "%s.build"\n' \
    "$route" "$route" "$ns" >>"$tmp/chaos.toml"
done

start_memcached() { # number
  nice -n 10 memcached -u "$(id -un)" -l 127.0.0.1 -p "${mc_port[$1]}" -m 64 -c 4096 \
    >>"$tmp/memcached$1.log" 2>&1 &
  pid[memcached$1]=$!
  wait_port "${mc_port[$1]}" "memcached $1"
}
start_gateway() { # number
  local port=gw$1 admin=adm$1
  TESSERA_LISTEN="127.0.0.1:${!port}" TESSERA_ADMIN_LISTEN="127.0.0.1:${!admin}" \
    TESSERA_AMQP_URL=$(amqp_from "$1") RUST_LOG=warn \
    nice -n 10 "$bin"/tessera-gateway --config "$tmp/chaos.toml" >>"$tmp/gateway$1.log" 2>&1 &
  pid[gateway$1]=$!
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:${!admin}/readyz" && return; sleep 0.1; done
  echo "chaos: gateway $1 not ready within 30 s; see $tmp/gateway$1.log" >&2; exit 1
}
start_worker() { # number
  TESSERA_AMQP_URL=$(amqp_from "$1") RUST_LOG=warn,tessera_workers=info \
    nice -n 10 "$bin"/tessera-worker --config "$tmp/chaos.toml" --admin-listen 127.0.0.1:0 \
    >>"$tmp/worker$1.log" 2>&1 &
  pid[worker$1]=$!
}

for i in 1 2 3; do start_memcached "$i"; done
nice -n 10 "$bin"/soak-upstream "127.0.0.1:$up" 20 2048 2>"$tmp/upstream.log" &
pid[upstream]=$!
wait_port "$up" soak-upstream
start_gateway 1; start_gateway 2
start_worker 1; start_worker 2

echo "== chaos: namespace $ns, memcached on ${mc_port[*]}, gateways 127.0.0.1:$gw1 and :$gw2 (admin :$adm1, :$adm2), logs in $tmp"
nice -n 10 "$bin"/soak-driver chaos "http://127.0.0.1:$gw1,http://127.0.0.1:$gw2" \
  "http://127.0.0.1:$adm1" "http://127.0.0.1:$up" "$tmp/marks" "$tmp/stop" >"$tmp/driver.out" 2>&1 &
pid[driver]=$!
for _ in $(seq 1200); do grep -q '^phase:baseline' "$tmp/marks" 2>/dev/null && break; sleep 0.1; done
grep -q '^phase:baseline' "$tmp/marks" || { echo "chaos: the hit set was not built within 120 s" >&2; exit 1; }
echo "== $(date +%T) phase:baseline"
sleep "$BASE"

phase() { [[ " $PHASES " == *" $1 "* ]]; }
phase memcached && for i in 1 2 3; do
  mark "phase:memcached-$i-killed"; kill -KILL "${pid[memcached$i]}"; wait "${pid[memcached$i]}" 2>/dev/null || true
  sleep "$DOWN"; start_memcached "$i"; mark "restore:memcached-$i-killed"; sleep "$AFTER"
done
if phase hang; then
  mark phase:memcached-2-hung; kill -STOP "${pid[memcached2]}"
  sleep "$DOWN"; kill -CONT "${pid[memcached2]}"; mark restore:memcached-2-hung; sleep "$AFTER"
fi

phase rabbitmq && for i in 1 2 3; do
  node=$(rq_pid "$i"); [[ -n $node ]] || { echo "chaos: RabbitMQ node $i is not running" >&2; exit 1; }
  mark "phase:rabbitmq-$i-killed"; rq_killed=1; kill -KILL "$node"
  sleep "$DOWN"; bash "$rq" up --nodes 3 --no-wait >/dev/null
  port=$(sed -E 's#.*:([0-9]+)/.*#\1#' <<<"${nodes[$((i - 1))]}")
  for _ in $(seq 600); do answers "$port" && break; sleep 0.2; done
  answers "$port" || { echo "chaos: RabbitMQ node $i did not come back within 120 s" >&2; exit 1; }
  mark "restore:rabbitmq-$i-killed"; rq_killed=0; sleep "$AFTER"
done

if phase worker; then
  mark phase:worker-killed; kill -KILL "${pid[worker1]}"; wait "${pid[worker1]}" 2>/dev/null || true
  sleep 10; start_worker 1; mark restore:worker-killed; sleep "$AFTER"
fi
if phase gateway; then
  mark phase:gateway-killed; kill -KILL "${pid[gateway2]}"; wait "${pid[gateway2]}" 2>/dev/null || true
  sleep 10; start_gateway 2; mark restore:gateway-killed; sleep "$AFTER"
fi

touch "$tmp/stop"
wait "${pid[driver]}" || true
unset 'pid[driver]'
cat "$tmp/driver.out"
echo "== logs: $tmp"
