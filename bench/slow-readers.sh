#!/usr/bin/env bash
# Slow readers: CLIENTS (default 1000) connections ask an embedded gateway for something
# large and never read, phase by phase: a cached 1 MB fragment (of control bytes, six
# times its size escaped), a push stream naming it 32 times under junk params, an ESI page
# (20 KB with a 10 KB include), a proxied 20 MB download. Printed per phase: the gateway's
# RSS before, its peak while the clients are held and after, the upstream connections
# held, and when the gateway had cut every client off (http.send_timeout, SEND_TIMEOUT
# seconds here, default 10, to keep the run short; the default is 60 s).
#
#   bash bench/slow-readers.sh [CLIENTS] [PHASES...]
#
# The target (issue 29): 1,000 non-reading clients add at most 64 MB to the gateway and
# hold no upstream connection past the timeout.
# TESSERA_BENCH_BIN=DIR runs the binaries in DIR instead of building target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-1000}; shift || true
phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=(fragment stream page download)
send_timeout=${SEND_TIMEOUT:-10}
bin=${TESSERA_BENCH_BIN:-}
if [[ -z $bin ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway
  bin=target/release
fi
ulimit -n 65536 || true
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-slow.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

me=slow-readers
# shellcheck source=bench/ports.sh
source bench/ports.sh
up=$(pick_port); gw=$(pick_port); adm=$(pick_port)
cat >"$tmp/tessera.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw"
admin_listen = "127.0.0.1:$adm"
[http]
send_timeout = "${send_timeout}s"
[upstream]
url = "http://127.0.0.1:$up"
[[fragment]]
name = "big"
render = "/_render/big"
fresh = "1h"
[[fragment]]
name = "small"
render = "/_render/small"
fresh = "1h"
TOML
python3 bench/slow_readers.py upstream "$up" & pids+=($!)
RUST_LOG=warn "$bin"/tessera-gateway --config "$tmp/tessera.toml" >"$tmp/gateway.log" 2>&1 &
gateway=$!; pids+=("$gateway")
wait_port "$up" upstream; wait_port "$gw" gateway
echo "== $clients clients per phase, http.send_timeout = ${send_timeout}s, held $((send_timeout / 2)) s before waiting for the cut"
python3 bench/slow_readers.py attack "$gateway" "$gw" "$adm" "$up" "$clients" "$((send_timeout / 2))" "${phases[@]}"
