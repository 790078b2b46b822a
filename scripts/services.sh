#!/usr/bin/env bash
# Installs (when missing) and starts the servers the tests need, on 127.0.0.1:
#   memcached on 11211 (Debian's package; installed with apt-get when missing),
#   RabbitMQ on 5672 (started when installed but not answering).
# Idempotent; every wait is bounded; exits non-zero saying what is missing.
set -euo pipefail

MEMCACHED_PORT=${TESSERA_TEST_MEMCACHED_PORT:-11211}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port, what, seconds
  for _ in $(seq $(( $3 * 10 ))); do answers "$1" && return 0; sleep 0.1; done
  echo "services: $2 is not answering on 127.0.0.1:$1 after $3 s" >&2
  return 1
}

if ! command -v memcached >/dev/null; then
  echo "== installing memcached"
  apt-get install -y -qq memcached >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq memcached >/dev/null; }
fi
if ! answers "$MEMCACHED_PORT"; then
  echo "== starting memcached on 127.0.0.1:$MEMCACHED_PORT"
  memcached -d -u root -l 127.0.0.1 -p "$MEMCACHED_PORT" -m 256 -c 4096
fi
wait_for "$MEMCACHED_PORT" memcached 10

if ! answers 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "== starting RabbitMQ"
    rabbitmq-server -detached
  else
    echo "services: RabbitMQ is neither answering on 127.0.0.1:5672 nor installed;" \
         "install it (apt-get install -y rabbitmq-server) and run this script again" >&2
    exit 1
  fi
fi
wait_for 5672 RabbitMQ 60
echo "== memcached on 127.0.0.1:$MEMCACHED_PORT and RabbitMQ on 127.0.0.1:5672 are up"
