#!/usr/bin/env bash
# Set up labforge on Debian 12 (as root): system packages and .venv.
#
#   bash scripts/setup.sh          what the build tasks need
#   bash scripts/setup.sh --test   plus what the test suite needs
#
# Debian packages are listed one per line in scripts/packages/*.run (always)
# and *.test (with --test).  Hooks in scripts/setup.d/*.sh run afterwards
# with MODE=run|test (extra virtualenvs, service installs).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
  --test) MODE=test ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

lists=(scripts/packages/*.run)
[ "$MODE" = test ] && lists+=(scripts/packages/*.test)
mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "${lists[@]}" | tr -s ' \t' '\n' | sort -u)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; run this script as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
if [ "$MODE" = test ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi

for hook in scripts/setup.d/*.sh; do
  [ -e "$hook" ] || continue
  MODE=$MODE bash "$hook"
done
echo "setup: ready ($MODE); tasks: .venv/bin/invoke --list" >&2
