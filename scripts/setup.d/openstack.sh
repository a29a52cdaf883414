#!/usr/bin/env bash
# Test-only: a real Keystone + Glance (and uWSGI to run them, and the
# openstack CLI the Glance benchmark compares against) in .venv-openstack.
# The versions are one OpenStack release (2026.2: keystone 30, glance 33),
# which supports Python 3.11 (Debian 12).  uwsgi builds from source: it needs
# gcc and the Python headers (scripts/packages/glance.test).
set -euo pipefail
[ "${MODE:-run}" = test ] || exit 0
cd "$(dirname "$0")/../.."
VENV=.venv-openstack
PINS=(keystone==30.0.0 glance==33.0.0 uwsgi==2.0.31 python-openstackclient==10.5.0)
stamp="$VENV/.labforge-pins"
has_tls() { "$VENV/bin/uwsgi" --help 2>/dev/null | grep -q -- '--https-socket '; }
if [ -x "$VENV/bin/uwsgi" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PINS[*]}" ] && has_tls; then
  exit 0
fi
echo "setup: installing Keystone, Glance, uWSGI into $VENV" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
if ! has_tls; then
  # a uwsgi wheel built (or cached) without libssl-dev: rebuild it with TLS support
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    --force-reinstall --no-deps "${PINS[2]}"
  has_tls || { echo "error: uwsgi in $VENV has no HTTPS support; install libssl-dev and rerun" >&2; exit 1; }
fi
echo "${PINS[*]}" > "$stamp"
