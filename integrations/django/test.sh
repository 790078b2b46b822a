#!/usr/bin/env bash
# The tessera-django package's tests: its own (Django's test runner, a site in memory)
# and the end-to-end test (e2e/: a small shop behind a real tessera-gateway, embedded
# mode). Django comes from PyPI into a venv under target/ (made once, then reused); the
# gateway is built when it is out of date.
# TESSERA_GATEWAY_BIN: use that gateway binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")"
repo=$(cd ../.. && pwd)
venv="$repo/target/tessera-django-venv"
django="5.2.20"   # the LTS release; the package asks for Django>=4.2

if [ ! -x "$venv/bin/python" ]; then
  echo "== tessera-django: making $venv"
  python3 -m venv "$venv" 2>/dev/null || {
    # Debian's python3 needs its venv module installed.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
    rm -rf "$venv" && python3 -m venv "$venv"
  }
fi
if ! "$venv/bin/python" -c "import django, sys; sys.exit(django.get_version() != '$django')" 2>/dev/null; then
  echo "== tessera-django: installing Django $django"
  "$venv/bin/pip" install -q --disable-pip-version-check "Django==$django"
fi
# Imported from elsewhere than here, where the source tree itself would be found.
if ! (cd / && "$venv/bin/python" -c "import tessera_django" 2>/dev/null); then
  echo "== tessera-django: installing the package (editable)"
  "$venv/bin/pip" install -q --disable-pip-version-check -e .
fi

if [ -z "${TESSERA_GATEWAY_BIN:-}" ]; then
  # The same build as the workspace's own end-to-end tests (tests/src/cluster.rs), so
  # after `cargo test` it has nothing left to do.
  (cd "$repo" && cargo build --locked -q -p tessera-gateway -p tessera-workers --bins)
  export TESSERA_GATEWAY_BIN="$repo/target/debug/tessera-gateway"
fi

echo "== tessera-django: unit tests"
"$venv/bin/python" -m django test tests --settings=tests.settings --pythonpath . -v 1
echo "== tessera-django: end to end (real gateway)"
"$venv/bin/python" e2e/test_e2e.py
