"""What every build that fetches from the network is given: the CA bundle
of an HTTPS-intercepting proxy (lab.yaml ``build.ca_bundle``), this
process's proxy variables, and the Python package index
(``build.pip_index``).  Used by diskimage-builder runs, the builder image
and downloads alike."""

from __future__ import annotations

import os
from pathlib import Path

from builders.core.errors import LabError
from builders.core.lab import Lab

PYPI = "https://pypi.org/simple"

# proxy settings a host run inherits from the environment; a container gets them passed
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def ca_bundle(lab: Lab) -> Path | None:
    """The CA bundle builds trust (build.ca_bundle); None when unset."""
    value = lab.build.ca_bundle
    if not value:
        return None
    path = lab.path(value)
    if not path.is_file():
        raise LabError(f"{lab.source.name}: build.ca_bundle: {path} does not exist; "
                       "give the CA bundle of your HTTPS proxy or set it to null")
    return path


def proxy_environment() -> dict[str, str]:
    """This process's proxy variables, for a container or a docker build."""
    return {k: os.environ[k] for k in PROXY_VARS if k in os.environ}


def pip_index(lab: Lab) -> str:
    """The package index URL builds use (build.pip_index, else PyPI), without a trailing /."""
    return (lab.build.pip_index or PYPI).rstrip("/")
