#!/usr/bin/env bash
# The whole test suite, from a clean clone on a fresh machine:
#   1. install and start what the tests need (memcached, RabbitMQ, a three-node RabbitMQ
#      cluster beside it for the failover test, Chromium, promtool, the deploy validators),
#   2. check formatting and lints,
#   3. run every test in the workspace,
#   4. run the Rails and Django integrations' tests (integrations/*/test.sh: Debian's
#      Rails, Django from PyPI in a venv under target/, each in front of a real gateway).
# Any step failing fails the run; nothing is skipped silently. On the way out, pass or
# fail, it stops the servers step 1 started, and only those (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(mktemp)
# The RabbitMQ cluster (scripts/rabbitmq-cluster.sh) is started once here, not per test:
# about a minute the first time. Stopped at the end only when this run started it.
cluster_was_up=$(bash scripts/rabbitmq-cluster.sh status 2>/dev/null | awk '$3 != "-"' | wc -l)
stop_started() {
  bash scripts/services.sh stop "$started"
  rm -f "$started"
  if [ "$cluster_was_up" = 0 ]; then bash scripts/rabbitmq-cluster.sh down; fi
}
trap stop_started EXIT
TESSERA_SERVICES_STARTED=$started bash scripts/services.sh
bash scripts/rabbitmq-cluster.sh up
bash scripts/deploy-tools.sh

# The browser tests drive Debian's Chromium through chromedriver; the metrics test lints
# the gateway's /metrics with promtool (Debian's prometheus package).
# apt-get install, after an update when the package lists are stale.
apt_install() {
  apt-get install -y -qq "$@" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  echo "== installing chromium and chromium-driver"
  apt_install chromium chromium-driver
fi
if ! command -v promtool >/dev/null; then
  echo "== installing prometheus (for promtool)"
  apt_install --no-install-recommends prometheus
  # Only promtool is wanted: the package's server would take 9090, the gateway's admin port.
  if command -v systemctl >/dev/null; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked -- --test-threads "${TESSERA_TEST_THREADS:-4}"
echo "== integrations/rails"
bash integrations/rails/test.sh
echo "== integrations/django"
bash integrations/django/test.sh
