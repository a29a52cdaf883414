"""Vagrant: libvirt boxes from built images, a versioned box catalog, and the
lab's Vagrantfile with the libvirt network XML it needs.

The package reads top to bottom:

- ``catalog``: box names and versions, where boxes and catalogs live, the
  catalog json, ``vagrant box add``;
- ``box``: the image to pack, the box's contents, the streamed and hashed tar;
- ``vagrantfile``: the lab's Vagrantfile;
- this module: the builders on the builder contract (``BOX``: box + catalog,
  ``VAGRANTFILE``: Vagrantfile + network XML, ``VAGRANT``: both, the
  ``vagrant`` step of ``invoke all``) and their function entry points.

The network XML comes from builders.tools.libvirt, the same generator and
rules as ``invoke libvirt-xml``.  See docs/vagrant.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builders.artifacts.baseimage import image_path
from builders.artifacts.vagrant.box import (ARCH, BOX_KIND, IMAGE_KINDS, backing_chain,
                                            box_metadata, box_vagrantfile, file_digest,
                                            image_info, make_box, pack_box, resolve_image,
                                            tar_mtime)
from builders.artifacts.vagrant.catalog import (CATALOG_KIND, VERSION_RE, box_path, box_stem,
                                                catalog_entry, catalog_path, catalog_url,
                                                catalog_with_version, check_box_name,
                                                check_version, installed_boxes, load_catalog,
                                                vagrant_box_add, version_key)
from builders.artifacts.vagrant.vagrantfile import (VAGRANTFILE_KIND, network_commands,
                                                    render_vagrantfile, seed_iso_path,
                                                    ssh_private_key, vagrant_dir, vfat_only_hosts)
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.errors import LabError
from builders.core.extcmd import tool_version
from builders.core.fsutil import remove_stale_parts
from builders.core.lab import Lab
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools import libvirt
from builders.tools.libvirt import NETWORK_KIND

__all__ = [
    "FORMAT", "BOX_KIND", "CATALOG_KIND", "VAGRANTFILE_KIND", "NETWORK_KIND", "IMAGE_KINDS",
    "BOX", "VAGRANTFILE", "VAGRANT", "BoxPlan", "plan_box",
    "build_box", "build_vagrantfile", "build_lab_vagrant", "network_commands",
    "render_vagrantfile", "box_metadata", "box_vagrantfile", "pack_box", "image_info",
    "resolve_image", "box_path", "box_stem", "catalog_path", "load_catalog",
    "catalog_with_version", "check_box_name", "check_version", "vagrant_box_add",
    "installed_boxes", "seed_iso_path", "ssh_private_key", "vagrant_dir", "vfat_only_hosts",
]

# Bump when the box layout, box Vagrantfile, catalog or templates change:
# it is part of every input digest, so outputs are rebuilt.
FORMAT = "labforge-vagrant-1"


def _show(ws: Workspace, path: Path) -> str:
    try:
        return path.relative_to(ws.artifacts.resolve()).as_posix()
    except ValueError:
        try:
            return path.relative_to(ws.artifacts).as_posix()
        except ValueError:
            return str(path)


# --------------------------------------------------------------------------
# box + catalog
# --------------------------------------------------------------------------
@dataclass
class BoxPlan:
    """Everything about one box decided before the build: the image, the
    resolved name and version, where the box and its catalog go."""
    name: str
    version: str
    image: Path
    image_record: dict | None
    info: dict
    arch: str
    content: str                  # digest of what the box holds, without its version
    box: Path
    catalog: Path
    url: str
    sha256: str | None = None     # of the box, once built in this run


def _default_version(manifest: Manifest, catalog: dict, name: str, content: str) -> str:
    """The version already built from these inputs, else latest + 0.0.1."""
    for rec in manifest.entries().values():
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


def plan_box(lab: Lab | None, ws: Workspace, *, image: str | None = None,
             name: str | None = None, version: str | None = None,
             base_url: str | None = None) -> BoxPlan:
    """Check the arguments and the image and settle name and version.

    ``name`` defaults to lab.yaml ``vagrant.box``; ``image`` to the lab's
    base image; ``version`` to the version already built from the same
    inputs, else the catalog's latest version with the patch number raised
    (1.0.0 for a new box)."""
    if name is None:
        name = lab.vagrant.box if lab is not None else "labforge/box"
    check_box_name(name)
    if version is not None:
        check_version(version)
    if image is None and lab is not None:
        image = str(image_path(lab, ws))
    if base_url is not None and not re.match(r"^(https?|file)://\S+$", base_url):
        raise LabError(f"--base-url {base_url!r}: not an http(s):// or file:// URL")
    img, rec = resolve_image(ws, image or "")
    info = image_info(img)
    cat_path = catalog_path(ws, name)
    catalog = load_catalog(cat_path, name)
    chain = backing_chain(img) if "_backing_path" in info else [img]
    arch = ARCH.get(str(((rec or {}).get("meta") or {}).get("arch", "amd64")), "amd64")
    content = input_digest(FORMAT, name, [file_digest(ws, p) for p in chain],
                           info.get("virtual-size"), arch)
    if version is None:
        version = _default_version(Manifest(ws.artifacts), catalog, name, content)
    box = box_path(ws, name, version)
    return BoxPlan(name, version, img, rec, info, arch, content, box, cat_path,
                   catalog_url(box, base_url))


class Box(Builder):
    """A vagrant-libvirt box and its catalog entry: two outputs, the box
    (``vagrant-box``) and the catalog json (``vagrant-catalog``).  When only
    the URL the box is served from changes, only the catalog is rewritten."""

    kind = BOX_KIND
    help = "pack a qcow2 as a vagrant-libvirt box and add it to its catalog"

    def outputs(self, lab: Lab | None, ws: Workspace, *, plan: BoxPlan | None = None,
                **options) -> list[Output]:
        p = plan or plan_box(lab, ws, **{k: options.get(k) for k in
                                         ("image", "name", "version", "base_url")})
        box = Output(p.box, BOX_KIND, f"vagrant-box {p.name} {p.version}",
                     inputs=(p.content, p.version, tar_mtime()), data=p)
        cat = Output(p.catalog, CATALOG_KIND, f"vagrant-catalog {p.name}",
                     inputs=(p.name, p.version, p.url, p.arch, box.digest()), data=p)
        return [box, cat]

    def _entry_matches(self, ctx: Context, p: BoxPlan) -> bool:
        """The catalog lists this version with the checksum of the box on disk."""
        entry = catalog_entry(load_catalog(p.catalog, p.name), p.version)
        rec = ctx.manifest.get(p.box)
        return entry is not None and rec is not None and entry.get("checksum") == rec["sha256"]

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        p: BoxPlan = out.data
        if super().up_to_date(ctx, out, digest) is None or not self._entry_matches(ctx, p):
            return None
        if out.kind == BOX_KIND:
            return p.box.name
        # the catalog is current only for a box that is
        box_digest = self.outputs(None, ctx.ws, plan=p)[0].digest()
        return "" if ctx.manifest.is_current(p.box, box_digest) else None

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        p: BoxPlan = out.data
        if out.kind == BOX_KIND:
            remove_stale_parts(p.box.parent)          # an interrupted run's, before staging
            sha, size = make_box(p.image, p.info, p.box, stage.file(p.box), p.name, p.version)
            p.sha256 = sha
            flat = "_backing_path" in p.info
            return Built(f"{p.box.name}, {size / 2**20:.0f} MiB, sha256 {sha[:12]}"
                         + (", flattened" if flat else ""),
                         meta={"name": p.name, "version": p.version, "provider": "libvirt",
                               "architecture": p.arch,
                               "virtual_size": box_metadata(p.info["virtual-size"])["virtual_size"],
                               "image": _show(ctx.ws, p.image), "flattened": flat,
                               "content_digest": p.content,
                               "catalog": ctx.manifest.rel(p.catalog)},
                         tools={"qemu-img": tool_version("qemu-img")}, sha256=sha)
        sha = p.sha256 or ctx.manifest.get(p.box)["sha256"]
        catalog = catalog_with_version(load_catalog(p.catalog, p.name), p.version, p.url, sha,
                                       p.arch)
        stage.write(p.catalog, json.dumps(catalog, indent=2) + "\n")
        return Built("" if p.sha256 else f"catalog URL now {p.url}",
                     meta={"name": p.name, "versions": [v["version"] for v in catalog["versions"]]})


BOX = Box()


def build_box(lab: Lab | None, ws: Workspace, *, image: str | None = None, name: str | None = None,
              version: str | None = None, add: bool = False, force: bool = False,
              base_url: str | None = None, vagrant_env: dict | None = None) -> list[Outcome]:
    """Pack ``image`` as a vagrant-libvirt box, add it to its catalog (see
    :func:`plan_box` for the defaults), and optionally ``vagrant box add`` it."""
    plan = plan_box(lab, ws, image=image, name=name, version=version, base_url=base_url)
    outcomes = run(BOX, lab, ws, force=force, plan=plan)
    if add:
        outcomes.append(vagrant_box_add(plan.catalog, plan.name, plan.version,
                                        force=outcomes[0].status == "built", env=vagrant_env))
    return outcomes


# --------------------------------------------------------------------------
# Vagrantfile + network XML
# --------------------------------------------------------------------------
@dataclass
class _Vagrantfile:
    text: str
    note: str                     # hosts with only a vfat seed
    stale: list[str]              # network XML of networks that left the lab (manifest rel)


class Vagrantfile(Builder):
    """artifacts/vagrant/Vagrantfile and networks/<name>.xml; network XML of
    networks no longer in the lab is removed (from vagrant/networks/ only)."""

    kind = VAGRANTFILE_KIND
    help = "the lab's Vagrantfile and libvirt network XML"

    def outputs(self, lab: Lab, ws: Workspace, *, with_catalog: bool = False,
                **_) -> list[Output]:
        if not lab.hosts:
            raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; "
                           "nothing to put in a Vagrantfile")
        libvirt.check_networks(lab)
        vdir = vagrant_dir(ws)
        manifest = Manifest(ws.artifacts)
        outs = []
        for net in lab.networks:
            path = vdir / "networks" / f"{net.name}.xml"
            text = libvirt.network_xml(lab, net)
            outs.append(Output(path, NETWORK_KIND, f"vagrantfile {manifest.rel(path)}",
                               inputs=(text,), data=text))
        wanted = {manifest.rel(o.path) for o in outs}
        mine = manifest.rel(vdir / "networks") + "/"
        stale = [rel for rel, rec in manifest.entries().items()
                 if rec.get("kind") == NETWORK_KIND and rel.startswith(mine) and rel not in wanted] \
            if manifest.path.exists() else []
        vfat = vfat_only_hosts(lab, ws)
        note = (f"{', '.join(vfat)}: only a vfat seed, which vagrant-libvirt cannot attach; "
                "run `invoke seed-iso` (ISO format) for them" if vfat else "")
        path = vdir / "Vagrantfile"
        text = render_vagrantfile(lab, ws, with_catalog=with_catalog)
        outs.append(Output(path, VAGRANTFILE_KIND, f"vagrantfile {manifest.rel(path)}",
                           inputs=(FORMAT, text), data=_Vagrantfile(text, note, stale)))
        return outs

    def prepare(self, ctx: Context, outputs: list[Output]) -> None:
        """The records of network XML that left the lab go first, so the
        manifest never names a file the build is about to remove."""
        for out in outputs:
            if out.kind == VAGRANTFILE_KIND:
                for rel in out.data.stale:
                    ctx.manifest.remove(rel)

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        if out.kind == VAGRANTFILE_KIND:
            v: _Vagrantfile = out.data
            if any(os.path.lexists(ctx.ws.artifacts / rel) for rel in v.stale):
                return None
            return None if super().up_to_date(ctx, out, digest) is None else v.note
        return super().up_to_date(ctx, out, digest)

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        meta = {"lab": ctx.lab.name}
        if out.kind == NETWORK_KIND:
            stage.write(out.path, out.data)
            return Built(meta=meta)
        v: _Vagrantfile = out.data
        stage.write(out.path, v.text)
        for rel in v.stale:                   # their XML would only mislead
            stage.remove(ctx.ws.artifacts / rel)
        gone = f"removed {', '.join(v.stale)}: not in the lab" if v.stale else ""
        return Built("; ".join(d for d in (v.note, gone) if d), meta=meta)


VAGRANTFILE = Vagrantfile()


def build_vagrantfile(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Render artifacts/vagrant/Vagrantfile and networks/<name>.xml."""
    return run(VAGRANTFILE, lab, ws, force=force)


# --------------------------------------------------------------------------
# `invoke all`'s step: both
# --------------------------------------------------------------------------
class Vagrant(Builder):
    """The ``vagrant`` step: the box of the lab's base image (when there is
    one) and the Vagrantfile with its network XML, in one run."""

    name = "vagrant"
    kind = BOX_KIND
    help = "Vagrant box of the base image, Vagrantfile, network XML"
    needs = ("base-image", "seed-iso")

    @staticmethod
    def _part(out: Output) -> Builder:
        return BOX if out.kind in (BOX_KIND, CATALOG_KIND) else VAGRANTFILE

    def outputs(self, lab: Lab, ws: Workspace, **_) -> list[Output]:
        base = image_path(lab, ws)
        boxes = BOX.outputs(lab, ws, image=str(base), name=lab.vagrant.box) \
            if base.is_file() else []
        # the Vagrantfile names the catalog this run writes
        return boxes + VAGRANTFILE.outputs(lab, ws, with_catalog=bool(boxes))

    def prepare(self, ctx: Context, outputs: list[Output]) -> None:
        VAGRANTFILE.prepare(ctx, [o for o in outputs if self._part(o) is VAGRANTFILE])

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        return self._part(out).up_to_date(ctx, out, digest)

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        return self._part(out).build(ctx, out, stage)


VAGRANT = Vagrant()


def build_lab_vagrant(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """`invoke all`'s step: the box of the lab's base image (when built), the
    Vagrantfile and the network XML."""
    base = image_path(lab, ws)
    if base.is_file():
        return run(VAGRANT, lab, ws, force=force)
    skipped = Outcome(f"vagrant-box {lab.vagrant.box}", "skipped", [],
                      f"no base image {base.stem} ({_show(ws, base)}); run the base image "
                      "build first")
    return [skipped, *run(VAGRANTFILE, lab, ws, force=force)]
