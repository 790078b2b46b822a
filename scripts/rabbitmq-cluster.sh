#!/usr/bin/env bash
# A RabbitMQ cluster on this machine, from Debian's rabbitmq-server: extra nodes beside the
# machine's own broker (rabbit@localhost on 5672, which this script never touches or joins).
#
#   scripts/rabbitmq-cluster.sh up     [--nodes N] [--no-wait]   # default 3; prints the AMQP URLs
#   scripts/rabbitmq-cluster.sh urls                 # the URLs, comma-separated (TESSERA_AMQP_URL)
#   scripts/rabbitmq-cluster.sh status               # one line per node: NAME PORT PID|-
#   scripts/rabbitmq-cluster.sh down                 # stops every node, deletes their data
#
# Node i (from 1) is tessera-rq<i>@localhost, takes AMQP on 127.0.0.1:$((BASE + i - 1))
# and Erlang distribution on $((BASE + 100 + i - 1)) (BASE: TESSERA_RABBITMQ_CLUSTER_PORT,
# default 5701; below the ranges tests and cluster.sh pick free ports from, so a stopped
# node's ports are still free when it starts again), and keeps its config file, enabled
# plugins (none), data, logs and pid file in DIR/rq<i> (DIR: TESSERA_RABBITMQ_CLUSTER_DIR,
# default /var/lib/rabbitmq/tessera-cluster). Nodes run as the rabbitmq user with its home,
# so they and rabbitmqctl share the broker's Erlang cookie (created when missing).
#
# `up` is idempotent: it starts the nodes that are not running (a node that was killed comes
# back into the cluster by itself), joins those that are not clustered yet to node 1, and
# returns once every node accepts AMQP connections. With --no-wait it only starts the nodes
# that are not running and returns: for bringing back a node that was stopped or killed,
# which rejoins by itself (the next `up` waits for it). `down` stops every node it finds in DIR
# and removes DIR, so the next `up` builds a new cluster. Needs root (or the rabbitmq user).
# Every wait is bounded; a failure exits non-zero naming the node and its log.
set -euo pipefail

BASE=${TESSERA_RABBITMQ_CLUSTER_PORT:-5701}
DIR=${TESSERA_RABBITMQ_CLUSTER_DIR:-/var/lib/rabbitmq/tessera-cluster}
RABBIT_HOME=/var/lib/rabbitmq
SBIN=/usr/lib/rabbitmq/bin

die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node() { echo "tessera-rq$1@localhost"; }
amqp_port() { echo $((BASE + $1 - 1)); }
dist_port() { echo $((BASE + 100 + $1 - 1)); }
url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }

# Runs a command as the rabbitmq user, with its home (and so its Erlang cookie).
as_rabbitmq() {
  if [[ $(id -un) == rabbitmq ]]; then
    env HOME="$RABBIT_HOME" "$@"
  else
    runuser -u rabbitmq -- env HOME="$RABBIT_HOME" "$@"
  fi
}

ctl() { # node index, rabbitmqctl arguments...
  local i=$1
  shift
  as_rabbitmq "$SBIN/rabbitmqctl" -q -n "$(node "$i")" "$@"
}

# The pid of node i when it runs (booting included), else nothing. The node's name is not
# on its command line (3.10 names the node from its environment), so Erlang VMs are told
# apart by that.
node_pid() {
  local pid
  for pid in $(pgrep -x beam.smp); do
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$(node "$1")"; then
      echo "$pid"
      return 0
    fi
  done
  return 0
}

# One `up` or `down` at a time (the test command, a test and a benchmark may overlap). The
# nodes started do not inherit the lock (start_node closes it for them).
lock() {
  mkdir -p "$(dirname "$DIR")"
  exec 9>"$DIR.lock"
  flock -w 300 9 || die "another $0 held $DIR.lock for 5 minutes"
}

# The count of nodes DIR holds, from their directories (0 when none).
known_nodes() {
  local n=0
  while [[ -d $DIR/rq$((n + 1)) ]]; do n=$((n + 1)); done
  echo "$n"
}

preflight() {
  [[ $(id -u) == 0 || $(id -un) == rabbitmq ]] || die "run it as root (it starts nodes as the rabbitmq user)"
  if [[ ! -x $SBIN/rabbitmq-server ]]; then
    [[ $(id -u) == 0 ]] || die "rabbitmq-server is not installed: apt-get install -y rabbitmq-server"
    echo "== installing rabbitmq-server"
    apt-get install -y -qq rabbitmq-server >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null; }
  fi
  id rabbitmq >/dev/null 2>&1 || die "there is no rabbitmq user: is rabbitmq-server installed?"
  # Nodes started together would each write a cookie of their own when none exists.
  if [[ ! -s $RABBIT_HOME/.erlang.cookie ]]; then
    # shellcheck disable=SC2016 # expanded by the inner sh, as the rabbitmq user
    as_rabbitmq sh -c 'umask 077; tr -dc A-Z </dev/urandom | head -c 20 >"$HOME/.erlang.cookie"; chmod 400 "$HOME/.erlang.cookie"'
  fi
}

# Writes node i's files and starts it in the background (it answers some 15 s later).
start_node() {
  local i=$1 d=$DIR/rq$1
  mkdir -p "$d/mnesia" "$d/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$(amqp_port "$i")" >"$d/rabbitmq.conf"
  echo '[].' >"$d/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$d"
  answers "$(amqp_port "$i")" && die "port $(amqp_port "$i") is taken by another program; set TESSERA_RABBITMQ_CLUSTER_PORT"
  as_rabbitmq \
    RABBITMQ_NODENAME="$(node "$i")" \
    RABBITMQ_NODE_PORT="$(amqp_port "$i")" \
    RABBITMQ_DIST_PORT="$(dist_port "$i")" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/pid" \
    setsid "$SBIN/rabbitmq-server" -detached </dev/null >>"$d/log/startup.log" 2>&1 9>&- ||
    die "$(node "$i") did not start; see $d/log"
}

# Waits until node i takes AMQP connections: its listener opens once it has booted.
await_node() { # index, seconds
  local i=$1
  for _ in $(seq $(($2 * 5))); do
    answers "$(amqp_port "$i")" && return 0
    sleep 0.2
  done
  die "$(node "$i") did not answer on 127.0.0.1:$(amqp_port "$i") within $2 s; see $DIR/rq$i/log"
}

# The nodes in node 1's cluster ("disk_nodes") or running in it ("running_nodes"),
# one a line.
members() { # disk_nodes|running_nodes
  ctl 1 cluster_status --formatter json 2>/dev/null | jq -r ".$1[]"
}

join() { # index
  local i=$1
  echo "== joining $(node "$i") to $(node 1)"
  ctl "$i" stop_app >/dev/null
  ctl "$i" join_cluster "$(node 1)" >/dev/null || die "$(node "$i") could not join $(node 1); see $DIR/rq$i/log"
  ctl "$i" start_app >/dev/null
}

up() {
  local n=3 wait=1
  while (($#)); do
    case $1 in
      --nodes) n=$2; shift 2 ;;
      --no-wait) wait=0; shift ;;
      *) die "unknown option $1 (see the top of $0)" ;;
    esac
  done
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a number from 1"
  command -v jq >/dev/null || die "jq is missing: apt-get install -y jq"
  preflight
  lock
  mkdir -p "$DIR"
  local i started=0
  for i in $(seq "$n"); do
    [[ -n $(node_pid "$i") ]] && continue
    echo "== starting $(node "$i") on 127.0.0.1:$(amqp_port "$i")"
    start_node "$i"
    started=1
  done
  if ((!wait)); then
    echo "== not waiting for the nodes to answer"
    return
  fi
  for i in $(seq "$n"); do await_node "$i" 120; done
  local members
  members=$(members disk_nodes)
  for i in $(seq 2 "$n"); do grep -qx "$(node "$i")" <<<"$members" || join "$i"; done
  members=$(members running_nodes)
  for i in $(seq 2 "$n"); do
    grep -qx "$(node "$i")" <<<"$members" || die "$(node "$i") is not running in $(node 1)'s cluster; see $DIR/rq$i/log"
  done
  ((started)) || echo "== the cluster was already up"
  echo "== RabbitMQ cluster of $n nodes; AMQP URLs:"
  for i in $(seq "$n"); do url "$i"; done
}

urls() {
  local n i out=()
  n=$(known_nodes)
  ((n)) || die "no cluster in $DIR (start one with: $0 up)"
  for i in $(seq "$n"); do out+=("$(url "$i")"); done
  (IFS=,; echo "${out[*]}")
}

status() {
  local n i pid
  n=$(known_nodes)
  ((n)) || { echo "rabbitmq-cluster: no cluster in $DIR" >&2; return 0; }
  for i in $(seq "$n"); do
    pid=$(node_pid "$i")
    echo "$(node "$i") $(amqp_port "$i") ${pid:--}"
  done
}

down() {
  local n i pid
  lock
  n=$(known_nodes)
  ((n)) || { echo "rabbitmq-cluster: nothing to stop in $DIR"; return 0; }
  for i in $(seq "$n"); do
    pid=$(node_pid "$i")
    [[ -n $pid ]] || continue
    echo "== stopping $(node "$i")"
    # `stop` returns once the node's process has exited; a node that hangs is killed.
    if ! as_rabbitmq timeout 60 "$SBIN/rabbitmqctl" -q -n "$(node "$i")" stop "$DIR/rq$i/pid" >/dev/null 2>&1; then
      echo "rabbitmq-cluster: $(node "$i") did not stop within 60 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for i in $(seq "$n"); do
    pid=$(node_pid "$i")
    [[ -z $pid ]] || die "$(node "$i") (pid $pid) is still running; $DIR is kept"
  done
  rm -rf "$DIR"
  echo "rabbitmq-cluster: stopped; $DIR removed"
}

command=${1:-}
[[ -n $command ]] || die "usage: $0 up|urls|status|down (see the top of $0)"
shift
case $command in
  up) up "$@" ;;
  urls) urls ;;
  status) status ;;
  down) down ;;
  *) die "unknown command $command (up, urls, status, down)" ;;
esac
