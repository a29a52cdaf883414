#!/usr/bin/env bash
# Octavia's controller-side code in its own virtualenv (.venv-octavia) for
# `invoke amphora-check`: the check drives the amphora's agent with Octavia's
# REST client, HAProxy templater and heartbeat code from the release the
# agent is built from (octavia.amphora.octavia_version, default below).
# Octavia's pins must not meet labforge's, so it is never imported by
# labforge itself: builders/checks/octavia_driver.py runs inside this venv.
# pyroute2: the REST driver imports it, octavia's metadata does not list it.
# amphora-check is a user task, so this runs in both modes (MODE=run|test).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-octavia
OCTAVIA_VERSION="${OCTAVIA_VERSION:-19.0.0}"
PINS=("octavia==$OCTAVIA_VERSION" "pyroute2==0.9.7")
stamp="$VENV/.labforge-pins"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PINS[*]}" ]; then
  exit 0
fi
echo "setup: installing Octavia $OCTAVIA_VERSION (controller code for amphora-check) into $VENV" >&2
rm -f "$stamp"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
"$VENV/bin/python" -W ignore -c "import octavia.amphorae.drivers.haproxy.rest_api_driver" \
  || { echo "error: Octavia in $VENV does not import; remove $VENV and rerun" >&2; exit 1; }
echo "${PINS[*]}" > "$stamp"
