#!/usr/bin/env bash
# The whole test suite, from a clean clone on a fresh machine:
#   1. install and start what the tests need (memcached, RabbitMQ, Chromium, promtool,
#      the deploy validators),
#   2. check formatting and lints,
#   3. run every test in the workspace.
# Any step failing fails the run; nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
bash scripts/deploy-tools.sh

# The browser tests drive Debian's Chromium through chromedriver; the metrics test lints
# the gateway's /metrics with promtool (Debian's prometheus package).
missing=()
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing+=(chromium chromium-driver)
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  if ! apt-get install -y -qq "${missing[@]}" >/dev/null; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked -- --test-threads "${TESSERA_TEST_THREADS:-4}"
