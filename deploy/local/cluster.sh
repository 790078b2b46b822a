#!/usr/bin/env bash
# A whole Tessera cluster on this machine, from the built binaries: memcached (started when
# none answers), RabbitMQ (started when none answers and it is installed), the demo upstream
# (unless --config names your own app), gateways and workers.
#
#   deploy/local/cluster.sh up     [--gateways N] [--workers N] [--config FILE] [--dir DIR]
#                                  [--memcached N|HOST:PORT[,HOST:PORT...]]
#                                  [--rabbitmq-nodes N | --amqp URL[,URL...]] [--bin DIR]
#                                  [--namespace NS] [--queue-expiry DURATION]
#   deploy/local/cluster.sh add    gateway|worker [--dir DIR]
#   deploy/local/cluster.sh status [--dir DIR]
#   deploy/local/cluster.sh down   [--dir DIR]
#
# `up` prints the URLs to open. `down` stops exactly what `up` and `add` started (their pids
# are in DIR/procs) and nothing else: a memcached or RabbitMQ that was already running is left
# alone. Defaults: 2 gateways, 2 workers, DIR=${TMPDIR:-/tmp}/tessera-cluster,
# --memcached 127.0.0.1:11211, --amqp amqp://guest:guest@127.0.0.1:5672/%2f, --bin
# target/release (build it with `cargo build --release -p tessera-gateway -p tessera-workers`).
# --memcached N starts N memcached servers of the cluster's own on free ports (stopped by
# `down`); --memcached with addresses uses those servers. --rabbitmq-nodes N (N > 1) runs the
# bus on an N-node RabbitMQ cluster beside the machine's broker (scripts/rabbitmq-cluster.sh,
# as root; `down` stops it only if `up` started it) with quorum queues; 1 is the default
# broker. The memcached servers and the AMQP URLs are passed to every process
# (TESSERA_MEMCACHED, TESSERA_AMQP_URL, comma-separated), over what a --config file says.
# Each process logs to DIR/logs/NAME.log. Without --config the demo's routes are configured
# in namespace NS (default tessera) on queue NS.build; --queue-expiry lets RabbitMQ drop that
# queue once unused (throw-away clusters).
#
# DIR/procs has one line per process: `KIND NAME PID URL ADMIN_URL` (`-` when none), and
# DIR/run/NAME.exit the exit status of one that ended: what the distributed end-to-end tests
# read.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() { echo "cluster: $*" >&2; exit 1; }

answers() { # host:port
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

# A TCP port nothing answers on now (a race with other programs is caught by `start`),
# below Linux's ephemeral range (32768-60999), where client connections take ports.
pick_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 12000))
    answers "127.0.0.1:$p" || { echo "$p"; return; }
  done
  die "no free port found"
}

# Whether PID runs (a zombie does not) and is the program named NAME.
alive() { # pid, name
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]] || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}

# Runs a command detached from this shell (own session, no inherited stdio, output to
# DIR/logs/NAME.log) under a small bash that reaps it and writes its exit status to
# DIR/run/NAME.exit; prints its pid (also in DIR/run/NAME.pid).
launch() { # name, command...
  local name=$1 run=$DIR/run/$1
  shift
  rm -f "$run.pid" "$run.exit"
  : >"$DIR/logs/$name.log"
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid bash -c '"${@:3}" </dev/null >>"$1" 2>&1 & echo $! >"$2.pid"; wait $!; echo $? >"$2.exit"' \
    _ "$DIR/logs/$name.log" "$run" "$@" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do
    [[ -s $run.pid ]] && { cat "$run.pid"; return; }
    sleep 0.02
  done
  die "$name did not start"
}

# Waits until `probe` succeeds (prints nothing) or the process dies (returns 1).
wait_ready() { # pid, name, seconds, probe...
  local pid=$1 name=$2 seconds=$3
  shift 3
  for _ in $(seq $((seconds * 10))); do
    alive "$pid" "$name" || return 1
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 2
}

probe() { # url
  "$BIN/tessera-gateway" --config "$CONFIG" probe "$1"
}

record() { echo "$*" >>"$DIR/procs"; }

load() {
  [[ -f $DIR/settings ]] || die "no cluster in $DIR (start one with: $0 up --dir $DIR)"
  # shellcheck source=/dev/null
  source "$DIR/settings"
  export TESSERA_MEMCACHED=$MEMCACHED TESSERA_AMQP_URL=$AMQP
  unset TESSERA_CONFIG TESSERA_LISTEN TESSERA_ADMIN_LISTEN
}

next_index() { # kind
  local n
  n=$(grep -c "^$1 " "$DIR/procs" 2>/dev/null || true)
  echo "${n:-0}"
}

# Starts one gateway or worker on fresh ports; retries when a port was taken meanwhile.
add() { # gateway|worker
  local kind=$1 n name log port admin pid status
  n=$(next_index "$kind")
  name="$kind-$n"
  log="$DIR/logs/$name.log"
  for attempt in 1 2 3 4 5; do
    admin=$(pick_port)
    if [[ $kind == gateway ]]; then
      port=$(pick_port)
      pid=$(TESSERA_LISTEN="127.0.0.1:$port" TESSERA_ADMIN_LISTEN="127.0.0.1:$admin" \
        launch "$name" "$BIN/tessera-gateway" --config "$CONFIG")
    else
      port=
      pid=$(launch "$name" "$BIN/tessera-worker" --config "$CONFIG" --admin-listen "127.0.0.1:$admin")
    fi
    status=0
    wait_ready "$pid" "tessera-$kind" 30 probe "http://127.0.0.1:$admin/healthz" || status=$?
    if [[ $status == 0 ]]; then
      local url=-
      [[ -n $port ]] && url="http://127.0.0.1:$port"
      record "$kind $name $pid $url http://127.0.0.1:$admin"
      echo "$kind $name $pid $url http://127.0.0.1:$admin"
      return
    fi
    if [[ $status == 2 ]]; then
      kill -KILL "$pid" 2>/dev/null || true
      die "$name did not answer within 30 s; see $log"
    fi
    grep -q "Address already in use" "$log" || die "$name exited at start:
$(tail -n 20 "$log")"
    echo "cluster: a port was taken meanwhile; retrying $name (attempt $attempt)" >&2
  done
  die "$name: no free ports after 5 attempts"
}

# Installs memcached when it is missing (as root).
install_memcached() {
  command -v memcached >/dev/null && return
  [[ $(id -u) == 0 ]] || die "memcached is not installed: apt-get install -y memcached"
  echo "== installing memcached"
  apt-get install -y -qq memcached >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq memcached >/dev/null; }
}

# Starts N memcached servers of the cluster's own on free ports; sets MEMCACHED to them.
start_memcached() { # count
  local i port pid status servers=()
  install_memcached
  for i in $(seq 0 $(($1 - 1))); do
    for _ in 1 2 3 4 5; do
      port=$(pick_port)
      pid=$(launch "memcached-$i" memcached -u "$(id -un)" -l 127.0.0.1 -p "$port" -m 64)
      status=0
      wait_ready "$pid" memcached 10 answers "127.0.0.1:$port" || status=$?
      [[ $status == 1 ]] || break   # 1: it exited (the port was taken)
    done
    [[ $status == 0 ]] || die "memcached-$i did not start; see $DIR/logs/memcached-$i.log"
    record "memcached memcached-$i $pid memcache://127.0.0.1:$port -"
    servers+=("127.0.0.1:$port")
  done
  MEMCACHED=$(IFS=,; echo "${servers[*]}")
}

ensure_memcached() {
  if [[ $MEMCACHED == *,* ]]; then
    local server
    for server in ${MEMCACHED//,/ }; do answers "$server" || die "memcached does not answer on $server"; done
    return
  fi
  answers "$MEMCACHED" && return
  local host=${MEMCACHED%:*} port=${MEMCACHED##*:}
  [[ $host == 127.0.0.1 || $host == localhost ]] || die "memcached does not answer on $MEMCACHED"
  install_memcached
  local pid
  pid=$(launch memcached memcached -u "$(id -un)" -l 127.0.0.1 -p "$port" -m 256)
  wait_ready "$pid" memcached 10 answers "$MEMCACHED" || die "memcached did not start; see $DIR/logs/memcached.log"
  record "memcached memcached $pid memcache://$MEMCACHED -"
}

# Brings up an N-node RabbitMQ cluster with scripts/rabbitmq-cluster.sh (recorded, so `down`
# stops it, unless all N nodes ran already); sets AMQP to its nodes' URLs.
start_rabbitmq_cluster() { # nodes
  local script=$ROOT/scripts/rabbitmq-cluster.sh running
  running=$(bash "$script" status 2>/dev/null | head -n "$1" | awk '$3 ~ /^[0-9]+$/' | wc -l)
  bash "$script" up --nodes "$1" || die "the RabbitMQ cluster did not start (see above)"
  AMQP=$(bash "$script" urls | cut -d, -f1-"$1")
  ((running == $1)) || record "rabbitmq-cluster rabbitmq-cluster - ${AMQP%%,*} -"
}

ensure_rabbitmq() {
  local url hostport
  if [[ $AMQP == *,* ]]; then
    for url in ${AMQP//,/ }; do
      hostport=$(sed -E 's#^amqps?://([^@/]*@)?([^/?]*).*#\2#' <<<"$url")
      answers "$hostport" && return
    done
    die "no RabbitMQ node of $AMQP answers"
  fi
  hostport=$(sed -E 's#^amqps?://([^@/]*@)?([^/?]*).*#\2#' <<<"$AMQP")
  [[ $hostport == *:* ]] || hostport="$hostport:5672"
  answers "$hostport" && return
  [[ $hostport == 127.0.0.1:5672 || $hostport == localhost:5672 ]] ||
    die "RabbitMQ does not answer on $hostport"
  command -v rabbitmq-server >/dev/null ||
    die "RabbitMQ does not answer on $hostport and is not installed: apt-get install -y rabbitmq-server"
  echo "== starting RabbitMQ"
  rabbitmq-server -detached
  record "rabbitmq rabbitmq - amqp://$hostport -"
  for _ in $(seq 600); do answers "$hostport" && return; sleep 0.1; done
  die "RabbitMQ did not start within 60 s"
}

# `a,b` as the TOML list `["a", "b"]`.
toml_list() {
  local out='' item
  for item in ${1//,/ }; do out+="${out:+, }\"$item\""; done
  echo "[$out]"
}

up() {
  local gateways=2 workers=2 config='' namespace=tessera expiry='' memcached_count=0 rabbitmq_nodes=1 amqp_given=0
  BIN=$ROOT/target/release
  MEMCACHED=127.0.0.1:11211
  AMQP='amqp://guest:guest@127.0.0.1:5672/%2f'
  while (($#)); do
    case $1 in
      --gateways) gateways=$2; shift 2 ;;
      --workers) workers=$2; shift 2 ;;
      --config) config=$(realpath "$2"); shift 2 ;;
      --memcached)
        if [[ $2 =~ ^[0-9]+$ ]]; then memcached_count=$2; else MEMCACHED=$2; fi
        shift 2 ;;
      --rabbitmq-nodes) rabbitmq_nodes=$2; shift 2 ;;
      --amqp) AMQP=$2; amqp_given=1; shift 2 ;;
      --namespace) namespace=$2; shift 2 ;;
      --queue-expiry) expiry=$2; shift 2 ;;
      --bin) BIN=$(realpath "$2"); shift 2 ;;
      *) die "unknown option $1 (see the top of $0)" ;;
    esac
  done
  [[ $gateways =~ ^[0-9]+$ && $workers =~ ^[0-9]+$ ]] || die "--gateways and --workers take numbers"
  [[ $memcached_count =~ ^[0-9]+$ && $memcached_count -le 32 ]] || die "--memcached takes a number up to 32 or addresses"
  [[ $rabbitmq_nodes =~ ^[1-9]$ ]] || die "--rabbitmq-nodes takes a number from 1 to 9"
  ((rabbitmq_nodes == 1 || ! amqp_given)) || die "give either --rabbitmq-nodes or --amqp, not both"
  for b in tessera-gateway tessera-worker; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found: cargo build --release -p tessera-gateway -p tessera-workers (or pass --bin DIR)"
  done
  if [[ -f $DIR/procs ]]; then
    while read -r _ name pid _; do
      [[ $pid != - ]] && alive "$pid" "" && die "a cluster is already running from $DIR ($name, pid $pid); stop it first: $0 down --dir $DIR"
    done <"$DIR/procs"
  fi
  mkdir -p "$DIR/logs" "$DIR/run"
  : >"$DIR/procs"
  CONFIG=${config:-$DIR/tessera.toml}
  trap '[[ $? == 0 ]] || { echo "cluster: start failed; stopping what was started" >&2; down; }' EXIT

  if ((memcached_count > 0)); then start_memcached "$memcached_count"; else ensure_memcached; fi
  if ((rabbitmq_nodes > 1)); then start_rabbitmq_cluster "$rabbitmq_nodes"; else ensure_rabbitmq; fi
  printf 'BIN=%q\nCONFIG=%q\nMEMCACHED=%q\nAMQP=%q\n' "$BIN" "$CONFIG" "$MEMCACHED" "$AMQP" >"$DIR/settings"
  load
  if [[ -z $config ]]; then
    local port pid status
    # A port picked free can be taken before the upstream binds it: try another, as add does.
    for _ in 1 2 3 4 5; do
      port=$(pick_port)
      pid=$(launch upstream "$BIN/tessera-gateway" demo-upstream --listen "127.0.0.1:$port")
      status=0
      wait_ready "$pid" tessera-gateway 10 answers "127.0.0.1:$port" || status=$?
      [[ $status == 1 ]] || break   # 1: it exited (the port was taken)
    done
    [[ $status == 0 ]] || die "the demo upstream did not start; see $DIR/logs/upstream.log"
    record "upstream upstream $pid http://127.0.0.1:$port -"
    {
      echo "# Written by deploy/local/cluster.sh: the demo upstream and its routes."
      printf '[upstream]\nurl = "http://127.0.0.1:%s"\n' "$port"
      printf '[store]\nmemcached = %s\nnamespace = "%s"\n' "$(toml_list "$MEMCACHED")" "$namespace"
      printf '[bus]\namqp = %s\n' "$(toml_list "$AMQP")"
      # A cluster's queues must outlive any one node.
      ((rabbitmq_nodes > 1)) && printf 'queue_type = "quorum"\n'
      [[ -n $expiry ]] && printf 'queue_expiry = "%s"\n' "$expiry"
      printf '[workers]\nembedded = 0\n\n'
      # Every route on the namespace's own queue, so clusters sharing a broker stay apart.
      sed "/^\[\[fragment\]\]/a queue = \"$namespace.build\"" "$ROOT/gateway/assets/demo.toml"
    } >"$CONFIG"
  fi
  for _ in $(seq "$gateways"); do add gateway >/dev/null; done
  for _ in $(seq "$workers"); do add worker >/dev/null; done
  trap - EXIT
  status
  echo "stop it with: $0 down --dir $DIR"
}

status() {
  [[ -f $DIR/procs ]] || die "no cluster in $DIR"
  local kind name pid url admin state
  while read -r kind name pid url admin; do
    state=stopped
    if [[ $pid == - ]]; then
      state="(started as a daemon)"
    elif alive "$pid" ""; then
      state="pid $pid"
    elif [[ -f $DIR/run/$name.exit ]]; then
      state="exited with status $(cat "$DIR/run/$name.exit")"
    fi
    case $kind in
      gateway) echo "$name  $url  (admin $admin, dashboard $admin/)  $state" ;;
      worker) echo "$name  admin $admin  $state" ;;
      *) echo "$name  $url  $state" ;;
    esac
  done <"$DIR/procs"
}

down() {
  [[ -f $DIR/procs ]] || { echo "cluster: nothing running from $DIR"; return 0; }
  local kind name pid _url _admin
  local -a pids=() names=()
  local rabbit=0 rabbit_cluster=0
  # Workers first (they finish their builds), then gateways, upstream, memcached.
  for k in worker gateway upstream memcached; do
    while read -r kind name pid _url _admin; do
      [[ $kind == "$k" && $pid != - ]] || continue
      local prog=tessera-$kind
      [[ $kind == upstream ]] && prog=tessera-gateway
      [[ $kind == memcached ]] && prog=memcached
      if alive "$pid" "$prog"; then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
        names+=("$prog")
      fi
    done <"$DIR/procs"
  done
  grep -q "^rabbitmq " "$DIR/procs" && rabbit=1
  grep -q "^rabbitmq-cluster " "$DIR/procs" && rabbit_cluster=1
  local i left
  for _ in $(seq 300); do
    left=0
    for i in "${!pids[@]}"; do alive "${pids[$i]}" "${names[$i]}" && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if alive "${pids[$i]}" "${names[$i]}"; then
      echo "cluster: ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 30 s; killing it" >&2
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
  done
  if ((rabbit)); then
    echo "== stopping the RabbitMQ this script started"
    timeout 60 rabbitmqctl stop >/dev/null 2>&1 || echo "cluster: rabbitmqctl stop failed" >&2
  fi
  if ((rabbit_cluster)); then
    echo "== stopping the RabbitMQ cluster this script started"
    bash "$ROOT/scripts/rabbitmq-cluster.sh" down >/dev/null || echo "cluster: stopping the RabbitMQ cluster failed" >&2
  fi
  rm -rf "$DIR/procs" "$DIR/settings" "$DIR/run"
  echo "cluster: stopped ${#pids[@]} processes; logs are in $DIR/logs"
}

command=${1:-}
[[ -n $command ]] || die "usage: $0 up|add|status|down [options] (see the top of $0)"
shift
DIR=${TMPDIR:-/tmp}/tessera-cluster
args=()
while (($#)); do
  case $1 in
    --dir) DIR=$(realpath -m "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"

case $command in
  up) up "$@" ;;
  add)
    [[ ${1:-} == gateway || ${1:-} == worker ]] || die "usage: $0 add gateway|worker [--dir DIR]"
    load
    add "$1"
    ;;
  status) status ;;
  down) down ;;
  *) die "unknown command $command (up, add, status, down)" ;;
esac
