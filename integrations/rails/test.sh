#!/usr/bin/env bash
# The tessera-rails gem's tests: its own (minitest, a Rails app in memory) and the
# end-to-end test (test/e2e: a small shop behind a real tessera-gateway, embedded mode).
# Installs Debian's Rails when missing and builds the gateway when it is out of date.
# TESSERA_GATEWAY_BIN: use that gateway binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")"
repo=$(cd ../.. && pwd)

packages=(ruby rake ruby-rails ruby-sqlite3 ruby-webrick ruby-minitest)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== tessera-rails: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

if [ -z "${TESSERA_GATEWAY_BIN:-}" ]; then
  # The same build as the workspace's own end-to-end tests (tests/src/cluster.rs), so
  # after `cargo test` it has nothing left to do.
  (cd "$repo" && cargo build --locked -q -p tessera-gateway -p tessera-workers --bins)
  export TESSERA_GATEWAY_BIN="$repo/target/debug/tessera-gateway"
fi

echo "== tessera-rails: unit tests"
ruby -Ilib -Itest -e 'Dir.glob("test/*_test.rb").sort.each { |f| require File.expand_path(f) }'
echo "== tessera-rails: end to end (real gateway)"
ruby test/e2e/e2e_test.rb
