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
if [ -x "$VENV/bin/uwsgi" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PINS[*]}" ]; then
  exit 0
fi
echo "setup: installing Keystone, Glance, uWSGI into $VENV" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
echo "${PINS[*]}" > "$stamp"
