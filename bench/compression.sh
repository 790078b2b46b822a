#!/usr/bin/env bash
# What compression costs: wrk against the gateway serving a cached 8 KB HTML fragment and a
# composed 32 KB page, asked plain, gzip and br, side by side in the same run with nginx
# compressing the same fragment file per request (`gzip on`, level 6, as the gateway's
# gzip). The gateway (1 tokio thread) and nginx (1 worker) share CPU 0; wrk runs on CPU 1.
# Prints requests/s, bytes per answer and CPU microseconds per request of the server.
#   bash bench/compression.sh [SECONDS_PER_RUN] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; conns=${2:-64}
for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
done
systemctl stop nginx 2>/dev/null || true   # the package's own instance, if it started one
cargo build --release -q -p tessera-gateway
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

# An 8 KB fragment of product rows and a page of 24 KB around one include of it.
mkdir -p "$tmp/www"; chmod 755 "$tmp"   # nginx workers (www-data) read the files
for i in $(seq 100); do
  printf '<li class="product"><a href="/p/%d">Product %d</a> <b>%d.%02d €</b></li>\n' \
    "$i" "$i" $((i * 7 % 300)) $((i * 13 % 100))
done | head -c 8192 >"$tmp/www/fragment.html"
{
  echo '<!doctype html><html><head><title>Shop</title></head><body><ul>'
  for i in $(seq 240); do printf '<li><a href="/c/%d">Category %d</a></li>\n' "$i" "$i"; done | head -c 24576
  echo '</ul><esi:include src="/fragments/bench"/></body></html>'
} >"$tmp/www/page.html"

ng=18090; gw=18080
cat >"$tmp/nginx.conf" <<NGINX
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/nginx.error.log;
events { worker_connections 1024; }
http {
  access_log off;
  default_type text/html;
  server {
    listen 127.0.0.1:$ng;
    location = /_render/bench { alias $tmp/www/fragment.html; }
    location = /page { alias $tmp/www/page.html; add_header Surrogate-Control 'content="ESI/1.0"'; }
    location = /peer { alias $tmp/www/fragment.html; gzip on; gzip_comp_level 6; gzip_min_length 1024; }
  }
}
NGINX
taskset -c 0 nginx -c "$tmp/nginx.conf" -p "$tmp" -g 'daemon off;' & pids+=($!)
cat >"$tmp/tessera.toml" <<TOML
[gateway]
listen = "127.0.0.1:$gw"
[upstream]
url = "http://127.0.0.1:$ng"
[[fragment]]
name = "bench"
render = "/_render/bench"
fresh = "1h"
TOML
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 target/release/tessera-gateway --config "$tmp/tessera.toml" & pids+=($!)
nginx_pid=${pids[0]}; gateway_pid=${pids[1]}
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Prefer: wait=5' "http://127.0.0.1:$gw/fragments/bench" || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "gateway never served the fragment (last status $code)"; exit 1; }

# CPU ticks (user + system) of a process and its children (nginx's workers).
ticks() {
  local stats=("/proc/$1/stat") child
  for child in $(pgrep -P "$1"); do stats+=("/proc/$child/stat"); done
  cat "${stats[@]}" | awk '{ t += $14 + $15 } END { print t }'
}
hz=$(getconf CLK_TCK)
# One run: label, url, pid whose CPU counts, Accept-Encoding.
run() {
  local before after out size
  size=$(curl -s -H "Accept-Encoding: $4" "$2" | wc -c)
  before=$(ticks "$3")
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency -H "Accept-Encoding: $4" "$2")
  after=$(ticks "$3")
  awk -v label="$1" -v size="$size" -v b="$before" -v a="$after" -v hz="$hz" '
    /requests in/ { n = $1 }
    /Requests\/sec/ { r = $2 }
    / 99%/ { p99 = $2 }
    END { printf "%-34s %8.0f req/s  %6d bytes  %7.1f us CPU/req  p99 %s\n", label, r, size, (a - b) / hz * 1e6 / n, p99 }' <<<"$out"
}
taskset -c 1 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$gw/fragments/bench" >/dev/null   # warm-up
echo "8 KB fragment, cached (L1 hit):"
run "  tessera, identity" "http://127.0.0.1:$gw/fragments/bench" "$gateway_pid" identity
run "  tessera, gzip" "http://127.0.0.1:$gw/fragments/bench" "$gateway_pid" gzip
run "  tessera, br" "http://127.0.0.1:$gw/fragments/bench" "$gateway_pid" br
run "  nginx static file, identity" "http://127.0.0.1:$ng/peer" "$nginx_pid" identity
run "  nginx static file, gzip on (6)" "http://127.0.0.1:$ng/peer" "$nginx_pid" gzip
echo "page composed from nginx + the cached fragment (compressed per request; CPU: the gateway's):"
run "  tessera, identity" "http://127.0.0.1:$gw/page" "$gateway_pid" identity
run "  tessera, gzip" "http://127.0.0.1:$gw/page" "$gateway_pid" gzip
run "  tessera, br" "http://127.0.0.1:$gw/page" "$gateway_pid" br
