#!/usr/bin/env bash
# diskimage-builder in its own virtualenv (.venv-dib): its dependency pins
# must not meet labforge's.  builders/dib.py finds it there.  MODE=run|test.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIB_VERSION="${DIB_VERSION:-3.43.0}"
if [ ! -x .venv-dib/bin/python ]; then
  python3 -m venv .venv-dib
fi
if ! .venv-dib/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('diskimage-builder') != '$DIB_VERSION')" 2>/dev/null; then
  echo "setup: installing diskimage-builder $DIB_VERSION into .venv-dib" >&2
  .venv-dib/bin/python -m pip install -q --disable-pip-version-check "diskimage-builder==$DIB_VERSION"
fi
