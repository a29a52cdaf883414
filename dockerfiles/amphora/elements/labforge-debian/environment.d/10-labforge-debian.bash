# diskimage-builder's dib-python element still defaults Debian to Python 2
# (environment.d/50-dib-python-version); bookworm has only Python 3, and
# Octavia's agent needs it.  Sorted before 50-, after debian-minimal's 10-.
if [ "${DISTRO_NAME:-}" = "debian" ] && [ -z "${DIB_PYTHON_VERSION:-}" ]; then
    export DIB_PYTHON_VERSION=3
fi
