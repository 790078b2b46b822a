#!/usr/bin/env bash
# Purge acknowledgements on the local cluster: two gateways (deploy/local/cluster.sh, no
# workers, on memcached and the running RabbitMQ), PURGES tag purges (default 1000) made
# one after another through the first gateway's admin API with `?wait=2s`. From each
# answer, `acknowledged.ms`: from the purge (before its store write) to the last
# gateway's acknowledgement, as the purging gateway saw it. Prints p50, p99 and the
# largest, and how many purges missed a gateway.
#   bash bench/purge-ack.sh [PURGES] [BIN]
# BIN is where the binaries are (default target/release, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}; bin=${2:-target/release}
bash scripts/services.sh >/dev/null
if [[ $bin == target/release ]]; then
  nice -n 10 cargo build --release -q -p tessera-gateway -p tessera-workers
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/tessera-purge-ack.XXXXXX")
cleanup() { deploy/local/cluster.sh down --dir "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
deploy/local/cluster.sh up --gateways 2 --workers 0 --dir "$dir" --bin "$bin" \
  --namespace "purgeack$RANDOM" --queue-expiry 1m >/dev/null
admin=$(awk '$1 == "gateway" {print $5; exit}' "$dir/procs")
python3 - "$admin" "$n" <<'EOF'
import json, sys, time, urllib.request

admin, n = sys.argv[1], int(sys.argv[2])
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for _ in range(100):  # until the gateways have heard each other's heartbeat
    status = json.load(http.open(f"{admin}/api/status"))
    if len(status["gateways"]) == 2:
        break
    time.sleep(0.1)
else:
    sys.exit("purge-ack: the two gateways do not know each other")
ms, missed = [], 0
for i in range(n):
    req = urllib.request.Request(f"{admin}/tags/bench-{i}?wait=2s", method="DELETE")
    acked = json.load(http.open(req))["acknowledged"]
    missed += bool(acked["missed"]) or acked["applied"] != 2
    ms.append(acked["ms"])
ms.sort()
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
print(f"{n} purges, 2 gateways: purge to last acknowledgement p50 {q(0.5)} ms, "
      f"p99 {q(0.99)} ms, max {ms[-1]} ms; {missed} missed a gateway")
EOF
