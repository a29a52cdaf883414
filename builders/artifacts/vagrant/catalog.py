"""Box names and versions, where boxes and catalogs live, the versioned box
catalog json, and ``vagrant box add``.

Catalog (``artifacts/boxes/<org>-<name>.json``)
    Vagrant's box metadata format: name, versions, one ``libvirt`` provider
    per version with url, ``checksum_type: sha256``, checksum, and
    ``architecture`` / ``default_architecture`` (read by Vagrant >= 2.4,
    ignored by older Vagrant such as Debian 12's 2.3.4).  A new version is
    added in place (atomic rewrite), so ``vagrant box outdated`` and
    ``vagrant box update`` see it.  URLs are absolute ``file://`` URLs
    (Vagrant 2.3.4 resolves a relative URL against its own working
    directory, not against the catalog), or ``base_url`` + file name when
    the boxes are published on a web server.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from builders.core.errors import LabError
from builders.core.extcmd import run
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace

CATALOG_KIND = "vagrant-catalog"
BOX_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,63}$", re.I)
VERSION_RE = re.compile(r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})$")


# --------------------------------------------------------------------------
# names, versions, paths
# --------------------------------------------------------------------------
def check_box_name(name: str, where: str = "--name") -> str:
    if not BOX_NAME_RE.match(name or ""):
        raise LabError(f"{where} {name!r}: not a box name like ORG/NAME (letters, digits, "
                       "'.', '_', '-'; e.g. labforge/debian-12)")
    return name


def check_version(version: str, where: str = "--version") -> str:
    if not VERSION_RE.match(version or ""):
        raise LabError(f"{where} {version!r}: not a box version like 1.2.3 "
                       "(MAJOR.MINOR.PATCH, digits only)")
    return version


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if VERSION_RE.match(version) else (-1,)


def box_stem(name: str) -> str:
    """``org/name`` -> ``org-name``: a safe file name stem (the name is checked)."""
    org, _, short = check_box_name(name).partition("/")
    return f"{org}-{short}"


def box_path(ws: Workspace, name: str, version: str) -> Path:
    return ws.artifacts / "boxes" / f"{box_stem(name)}-{version}.box"


def catalog_path(ws: Workspace, name: str) -> Path:
    return ws.artifacts / "boxes" / f"{box_stem(name)}.json"


# --------------------------------------------------------------------------
# the catalog
# --------------------------------------------------------------------------
def load_catalog(path: Path, name: str) -> dict:
    """The catalog at ``path`` (or a new one); it must be for box ``name``."""
    if not path.exists():
        return {"name": name, "description": f"{name}, built by labforge", "versions": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"{path}: unreadable box catalog ({exc}); move it away and rebuild "
                       "the box versions you need") from None
    if not isinstance(data, dict) or not isinstance(data.get("versions", []), list):
        raise LabError(f"{path}: not a Vagrant box catalog; move it away and rebuild")
    if data.get("name") != name:
        raise LabError(f"{path}: is the catalog of box {data.get('name')!r}, not {name!r}; "
                       "pick another --name (box file names replace '/' by '-')")
    data.setdefault("versions", [])
    return data


def catalog_url(box: Path, base_url: str | None) -> str:
    if base_url:
        return base_url.rstrip("/") + "/" + box.name
    return box.resolve().as_uri()


def catalog_with_version(catalog: dict, version: str, url: str, sha256: str, arch: str) -> dict:
    """A copy of ``catalog`` with ``version`` set to this box (added or replaced)."""
    provider = {"name": "libvirt", "url": url, "checksum_type": "sha256", "checksum": sha256,
                "architecture": arch, "default_architecture": True}
    versions, others = [], []
    for v in catalog.get("versions", []):
        if v.get("version") == version:   # other providers of this version stay
            others = [p for p in v.get("providers", []) if p.get("name") != "libvirt"]
        else:
            versions.append(v)
    versions.append({"version": version, "status": "active", "providers": [provider, *others]})
    versions.sort(key=lambda v: version_key(str(v.get("version", ""))))
    return {**catalog, "versions": versions}


def catalog_entry(catalog: dict, version: str) -> dict | None:
    for v in catalog.get("versions", []):
        if v.get("version") == version:
            for p in v.get("providers", []):
                if p.get("name") == "libvirt":
                    return p
    return None


# --------------------------------------------------------------------------
# vagrant box add
# --------------------------------------------------------------------------
def vagrant_box_add(catalog: Path, name: str, version: str, *, force: bool = False,
                    env: dict | None = None) -> Outcome:
    """``vagrant box add`` the catalog's ``version`` (a no-op when present)."""
    step = f"vagrant box add {name} {version}"
    if shutil.which("vagrant") is None:
        return Outcome(step, "skipped", [], "vagrant is not installed (Debian packages vagrant "
                       "and vagrant-libvirt); add it later with `vagrant box add "
                       f"{catalog.resolve().as_uri()}`")
    if not force and (name, "libvirt", version) in installed_boxes(env):
        return Outcome(step, "up to date", [], "already in `vagrant box list`")
    argv = ["vagrant", "box", "add", "--provider", "libvirt", "--box-version", version,
            catalog.resolve().as_uri()]
    if force:
        argv.insert(3, "--force")
    run(argv, env=env, what="vagrant box add")
    return Outcome(step, "built", [], "added; use it with config.vm.box = " + repr(name))


def installed_boxes(env: dict | None = None) -> set[tuple[str, str, str]]:
    """(name, provider, version) of every box in ``vagrant box list``."""
    proc = run(["vagrant", "box", "list", "--machine-readable"], env=env, what="vagrant box list")
    boxes, cur = set(), {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        parts = line.split(",", 3)
        if len(parts) < 4:
            continue
        key, value = parts[2], parts[3]
        if key == "box-name":
            cur = {"name": value}
        elif key == "box-provider":
            cur["provider"] = value
        elif key == "box-version":
            cur["version"] = value
            boxes.add((cur.get("name", ""), cur.get("provider", ""), value))
    return boxes

