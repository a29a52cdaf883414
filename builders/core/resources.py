"""The files labforge reads at run time, found in a checkout or in an installed copy.

Three things ship with labforge besides its code: the embedded default lab
(``lab.yaml``), ``dockerfiles/`` (the amphora builder's Dockerfile and local
diskimage-builder elements, and the kpartx/dmsetup stand-ins under
``dockerfiles/dib/bin``) and the JSON schemas under ``builders/schemas``.

In a source checkout ``lab.yaml`` and ``dockerfiles/`` sit at the top of the
checkout, beside the ``builders`` package.  An installed wheel (``pip install
.``, pipx) carries copies of them inside the package, as ``builders/_data/``
(``setup.py`` copies them there when the wheel is built).  This module is
the one place that knows both layouts; everything else asks it.

Only shipped, read-only files are resources.  Outputs (``certs/``,
``artifacts/``, ``cache/``) belong to the workspace
(:mod:`builders.core.workspace`), and the checkout's virtualenvs (such as
``.venv-dib``) to :func:`checkout_dir`'s callers.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]       # .../builders
_DATA_DIR = PACKAGE_DIR / "_data"                         # the installed copy's resources


def checkout_dir() -> Path | None:
    """The source checkout this code runs from, or None in an installed copy.

    A checkout is recognised by its ``pyproject.toml`` and ``dockerfiles/``
    beside the package (an editable install runs from the checkout too)."""
    top = PACKAGE_DIR.parent
    if (top / "pyproject.toml").is_file() and (top / "dockerfiles").is_dir():
        return top
    return None


def resource(*parts: str) -> Path:
    """A shipped file or directory, e.g. ``resource("dockerfiles", "amphora")``:
    the checkout's when running from one, else the installed package's copy."""
    base = checkout_dir() or _DATA_DIR
    return base.joinpath(*parts)


def default_lab() -> Path:
    """The embedded default lab (``lab.yaml``)."""
    return resource("lab.yaml")


def is_embedded_lab(path: Path) -> bool:
    """True when ``path`` is the embedded default lab of an installed copy:
    a file inside the package, beside nothing the user owns."""
    return checkout_dir() is None and Path(path).resolve() == default_lab().resolve()


def dockerfiles(*parts: str) -> Path:
    """A path under ``dockerfiles/`` (build containers and their elements)."""
    return resource("dockerfiles", *parts)


def schema(name: str) -> Path:
    """A JSON schema under ``builders/schemas`` (package data in both layouts)."""
    return PACKAGE_DIR / "schemas" / name
