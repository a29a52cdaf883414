"""Vagrant: libvirt boxes from built images, a versioned box catalog, and the
lab's Vagrantfile with the libvirt network XML it needs.

The package reads top to bottom:

- ``catalog``: box names and versions, where boxes and catalogs live, the
  catalog json, ``vagrant box add``;
- ``box``: the image to pack, the box's contents, the streamed and hashed tar;
- ``vagrantfile``: the lab's Vagrantfile;
- this module: the entry points (``invoke vagrant-box``, ``invoke
  vagrantfile``, and ``invoke all``'s ``vagrant`` step).

The network XML comes from builders.tools.libvirt, the same generator and
rules as ``invoke libvirt-xml``.  See docs/vagrant.md.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from builders.artifacts.vagrant.box import (BOX_KIND, IMAGE_KINDS, backing_chain, box_metadata,
                                            box_vagrantfile, file_digest, image_info, make_box,
                                            pack_box, resolve_image, ARCH)
from builders.artifacts.vagrant.catalog import (CATALOG_KIND, box_path, box_stem, catalog_entry,
                                                catalog_path, catalog_url, catalog_with_version,
                                                check_box_name, check_version, VERSION_RE, version_key,
                                                installed_boxes, load_catalog, vagrant_box_add)
from builders.artifacts.vagrant.vagrantfile import (VAGRANTFILE_KIND, network_commands,
                                                    render_vagrantfile, seed_iso_path,
                                                    ssh_private_key, vagrant_dir, vfat_only_hosts)
from builders.core.errors import LabError
from builders.core.extcmd import tool_version
from builders.core.fsutil import atomic_write, remove_stale_parts
from builders.core.lab import Lab
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace
from builders.tools import libvirt
from builders.tools.libvirt import NETWORK_KIND

__all__ = [
    "FORMAT", "BOX_KIND", "CATALOG_KIND", "VAGRANTFILE_KIND", "NETWORK_KIND", "IMAGE_KINDS",
    "build_box", "build_vagrantfile", "build_lab_vagrant", "network_commands",
    "render_vagrantfile", "box_metadata", "box_vagrantfile", "pack_box", "image_info",
    "resolve_image", "box_path", "box_stem", "catalog_path", "load_catalog",
    "catalog_with_version", "check_box_name", "check_version", "vagrant_box_add",
    "installed_boxes", "seed_iso_path", "ssh_private_key", "vagrant_dir", "vfat_only_hosts",
]

# Bump when the box layout, box Vagrantfile, catalog or templates change:
# it is part of every input digest, so outputs are rebuilt.
FORMAT = "labforge-vagrant-1"


def build_box(lab: Lab | None, ws: Workspace, *, image: str | None = None, name: str | None = None,
              version: str | None = None, add: bool = False, force: bool = False,
              base_url: str | None = None, vagrant_env: dict | None = None) -> list[Outcome]:
    """Pack ``image`` as a vagrant-libvirt box, add it to its catalog, and
    optionally ``vagrant box add`` it.

    ``name`` defaults to lab.yaml ``vagrant.box``; ``version`` defaults to
    the version already built from the same inputs, else the catalog's
    latest version with the patch number raised (1.0.0 for a new box).
    """
    start = time.monotonic()
    if name is None:
        name = lab.vagrant.box if lab is not None else "labforge/box"
    check_box_name(name)
    if version is not None:
        check_version(version)
    if image is None and lab is not None:
        image = f"{lab.base_image.distro}-{lab.base_image.release}"
    if base_url is not None and not re.match(r"^(https?|file)://\S+$", base_url):
        raise LabError(f"--base-url {base_url!r}: not an http(s):// or file:// URL")
    img, rec = resolve_image(ws, image or "")
    info = image_info(img)
    cat_path = catalog_path(ws, name)
    catalog = load_catalog(cat_path, name)
    manifest = Manifest(ws.artifacts)

    chain = backing_chain(img) if "_backing_path" in info else [img]
    arch = ARCH.get(str(((rec or {}).get("meta") or {}).get("arch", "amd64")), "amd64")
    content = input_digest(FORMAT, name, [file_digest(ws, p) for p in chain],
                           info.get("virtual-size"), arch)
    if version is None:
        version = _default_version(manifest, catalog, name, content)
    box = box_path(ws, name, version)
    url = catalog_url(box, base_url)
    digest = input_digest(content, version)
    outcomes: list[Outcome] = []
    step = f"vagrant-box {name} {version}"

    with BuildLock(ws):
        entry = catalog_entry(load_catalog(cat_path, name), version)
        box_rec = manifest.get(box)
        if (not force and manifest.is_current(box, digest) and entry is not None
                and box_rec is not None and entry.get("checksum") == box_rec["sha256"]):
            if entry.get("url") != url:     # only where it is served from changed
                _write_catalog(manifest, cat_path, name, version, url, box_rec["sha256"], arch)
                outcomes.append(Outcome(step, "built", [cat_path], f"catalog URL now {url}"))
            else:
                outcomes.append(Outcome(step, "up to date", [box, cat_path], str(box.name)))
            built = False
        else:
            remove_stale_parts(box.parent)
            sha, size = make_box(img, info, box, name, version)
            manifest.record(box, BOX_KIND, digest, sha256=sha,
                            tools={"qemu-img": tool_version("qemu-img")},
                            meta={"name": name, "version": version, "provider": "libvirt",
                                  "architecture": arch,
                                  "virtual_size": box_metadata(info["virtual-size"])["virtual_size"],
                                  "image": _show(ws, img),
                                  "flattened": "_backing_path" in info,
                                  "content_digest": content,
                                  "catalog": manifest.rel(cat_path)})
            _write_catalog(manifest, cat_path, name, version, url, sha, arch)
            what = f"{box.name}, {size / 2**20:.0f} MiB, sha256 {sha[:12]}"
            if "_backing_path" in info:
                what += ", flattened"
            outcomes.append(Outcome(step, "built", [box, cat_path], what,
                                    time.monotonic() - start))
            built = True
    if add:
        outcomes.append(vagrant_box_add(cat_path, name, version, force=built, env=vagrant_env))
    return outcomes


def _write_catalog(manifest: Manifest, cat_path: Path, name: str, version: str, url: str,
                   sha: str, arch: str) -> None:
    catalog = catalog_with_version(load_catalog(cat_path, name), version, url, sha, arch)
    atomic_write(cat_path, json.dumps(catalog, indent=2) + "\n")
    manifest.record(cat_path, CATALOG_KIND, input_digest(catalog),
                    meta={"name": name, "versions": [v["version"] for v in catalog["versions"]]})



def _show(ws: Workspace, path: Path) -> str:
    try:
        return path.relative_to(ws.artifacts.resolve()).as_posix()
    except ValueError:
        try:
            return path.relative_to(ws.artifacts).as_posix()
        except ValueError:
            return str(path)


def _default_version(manifest: Manifest, catalog: dict, name: str, content: str) -> str:
    """The version already built from these inputs, else latest + 0.0.1."""
    for rel, rec in manifest.entries().items():
        meta = rec.get("meta") or {}
        if (rec.get("kind") == BOX_KIND and meta.get("name") == name
                and meta.get("content_digest") == content
                and catalog_entry(catalog, str(meta.get("version"))) is not None):
            return str(meta["version"])
    known = [str(v.get("version")) for v in catalog.get("versions", [])
             if VERSION_RE.match(str(v.get("version", "")))]
    if not known:
        return "1.0.0"
    major, minor, patch = max(version_key(v) for v in known)
    return f"{major}.{minor}.{patch + 1}"


def build_vagrantfile(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Render artifacts/vagrant/Vagrantfile and networks/<name>.xml."""
    start = time.monotonic()
    if not lab.hosts:
        raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to put in a Vagrantfile")
    # render everything first: a problem leaves nothing written
    libvirt.check_networks(lab)
    files: dict[Path, tuple[str, str]] = {}
    vdir = vagrant_dir(ws)
    for net in lab.networks:
        files[vdir / "networks" / f"{net.name}.xml"] = (NETWORK_KIND, libvirt.network_xml(lab, net))
    files[vdir / "Vagrantfile"] = (VAGRANTFILE_KIND, render_vagrantfile(lab, ws))
    manifest = Manifest(ws.artifacts)
    vfat = vfat_only_hosts(lab, ws)
    note = (f"{', '.join(vfat)}: only a vfat seed, which vagrant-libvirt cannot attach; "
            "run `invoke seed-iso` (ISO format) for them" if vfat else "")
    outcomes = []
    with BuildLock(ws):
        for path, (kind, text) in files.items():
            digest = input_digest(FORMAT, kind, text)
            rel = manifest.rel(path)
            detail = note if kind == VAGRANTFILE_KIND else ""
            if not force and manifest.is_current(path, digest):
                outcomes.append(Outcome(f"vagrantfile {rel}", "up to date", [path], detail))
                continue
            atomic_write(path, text)
            manifest.record(path, kind, digest, meta={"lab": lab.name})
            outcomes.append(Outcome(f"vagrantfile {rel}", "built", [path], detail,
                                    seconds=time.monotonic() - start))
        # networks no longer in the lab: their XML would only mislead (only
        # under vagrant/networks/: libvirt-xml's net-*.xml are its own)
        wanted = {manifest.rel(p) for p in files}
        mine = manifest.rel(vdir / "networks") + "/"
        for rel, rec in list(manifest.entries().items()):
            if rec.get("kind") == NETWORK_KIND and rel.startswith(mine) and rel not in wanted:
                (ws.artifacts / rel).unlink(missing_ok=True)
                manifest.remove(rel)
                outcomes.append(Outcome(f"vagrantfile {rel}", "built", [], "removed: not in the lab"))
    return outcomes


def build_lab_vagrant(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """`invoke all`'s step: the box of the lab's base image (when built), the
    Vagrantfile and the network XML."""
    outcomes: list[Outcome] = []
    base = f"{lab.base_image.distro}-{lab.base_image.release}"
    try:
        Manifest(ws.artifacts).find(base, kinds=("base-image",))
        have_base = True
    except LabError:
        have_base = False
    if have_base:
        outcomes += build_box(lab, ws, image=base, name=lab.vagrant.box, force=force)
    else:
        outcomes.append(Outcome(f"vagrant-box {lab.vagrant.box}", "skipped", [],
                                f"no base image {base} in the manifest; run the base image build first"))
    outcomes += build_vagrantfile(lab, ws, force=force)
    return outcomes
