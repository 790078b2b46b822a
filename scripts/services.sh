#!/usr/bin/env bash
# Installs (when missing) and starts the servers the tests need, on 127.0.0.1:
#   memcached on 11211 (Debian's package; installed with apt-get when missing),
#   RabbitMQ on 5672 (started when installed but not answering).
# Idempotent; every wait is bounded; exits non-zero saying what is missing.
#
# What it starts, and only that, is written to the file named by
# TESSERA_SERVICES_STARTED (when set), one line each:
#   memcached PIDFILE PORT
#   rabbitmq
# and `bash scripts/services.sh stop FILE` stops what FILE lists (scripts/test.sh does on
# exit). A server found running is never listed, so it is never stopped.
set -euo pipefail

MEMCACHED_PORT=${TESSERA_TEST_MEMCACHED_PORT:-11211}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port, what, seconds
  for _ in $(seq $(( $3 * 10 ))); do answers "$1" && return 0; sleep 0.1; done
  echo "services: $2 is not answering on 127.0.0.1:$1 after $3 s" >&2
  return 1
}

started() { # what this run started, for `stop`
  if [ -n "${TESSERA_SERVICES_STARTED:-}" ]; then echo "$*" >>"$TESSERA_SERVICES_STARTED"; fi
}

# Stops a memcached this script started: the process in its pid file, if it is still a
# memcached on that port (a pid can be reused), then waits for the port to close.
stop_memcached() { # pidfile, port
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = memcached ] &&
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-p $2 "; then
    echo "== stopping the memcached started on 127.0.0.1:$2 (pid $pid)"
    kill "$pid"
    for _ in $(seq 50); do answers "$2" || break; sleep 0.1; done
  fi
  rm -f "$1"
}

if [ "${1:-}" = stop ]; then
  list=${2:?usage: services.sh stop FILE}
  [ -f "$list" ] || exit 0
  while read -r what pidfile port; do
    case $what in
      memcached) stop_memcached "$pidfile" "$port" ;;
      rabbitmq)
        echo "== stopping the RabbitMQ started for the tests"
        rabbitmqctl stop >/dev/null || echo "services: rabbitmqctl stop failed" >&2
        ;;
    esac
  done <"$list"
  exit 0
fi

if ! command -v memcached >/dev/null; then
  echo "== installing memcached"
  apt-get install -y -qq memcached >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq memcached >/dev/null; }
fi
if ! answers "$MEMCACHED_PORT"; then
  echo "== starting memcached on 127.0.0.1:$MEMCACHED_PORT"
  pidfile="${TMPDIR:-/tmp}/tessera-memcached-$MEMCACHED_PORT.pid"
  memcached -d -u root -l 127.0.0.1 -p "$MEMCACHED_PORT" -m 256 -c 4096 -P "$pidfile"
  started memcached "$pidfile" "$MEMCACHED_PORT"
fi
wait_for "$MEMCACHED_PORT" memcached 10

if ! answers 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "== starting RabbitMQ"
    rabbitmq-server -detached
    started rabbitmq
  else
    echo "services: RabbitMQ is neither answering on 127.0.0.1:5672 nor installed;" \
         "install it (apt-get install -y rabbitmq-server) and run this script again" >&2
    exit 1
  fi
fi
wait_for 5672 RabbitMQ 60
echo "== memcached on 127.0.0.1:$MEMCACHED_PORT and RabbitMQ on 127.0.0.1:5672 are up"
