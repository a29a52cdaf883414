"""Per-VM copy-on-write disks: ``artifacts/vms/<host>.qcow2``.

Each host's overlay is a qcow2 backed by its base image
(``artifacts/images/<host.image>.qcow2``) with an explicit backing format
(``-F qcow2``: qemu never probes a backing file's format) and the host's
disk size from lab.yaml, as ``qemu-img create -b`` or ``virsh vol-create-as
--backing-vol`` make it.  The backing file is recorded relative to the
overlay (``../images/debian-12.qcow2``), so artifacts/ can be moved or
published as a tree.

Creating an overlay writes only qcow2 metadata, so it takes the same time
for a 1 GB and a 100 GB base.

An overlay a VM has written to holds the user's data: when its inputs
change (a new base image, another disk size) it is not recreated unless
``force`` is given.  "Written to" is read from the overlay itself: a fresh
overlay has no data clusters of its own (``qemu-img map``).
"""

from __future__ import annotations

import os
from pathlib import Path

from builders.core import extcmd
from builders.core.errors import LabError
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.fsutil import sha256_file
from builders.core.lab import Host, Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools.qemu_img import check as qemu_check, check_chain, create_overlay, written_bytes
from builders.tools.qemu_img import info as qemu_info

GiB = 1 << 30


def overlay_path(ws: Workspace, host: Host | str) -> Path:
    name = host if isinstance(host, str) else host.name
    return ws.artifacts / "vms" / f"{name}.qcow2"


def base_path(ws: Workspace, host: Host) -> Path:
    return ws.artifacts / "images" / f"{host.image}.qcow2"


def _check_base(lab: Lab, ws: Workspace, host: Host, manifest: Manifest,
                seen: dict) -> tuple[Path, dict, str]:
    base = base_path(ws, host)
    where = f"{lab.source.name}: hosts.{host.name}"
    if not base.is_file():
        raise LabError(f"{where}.image: {base} does not exist; run `invoke base-image` "
                       f"(or put a qcow2 named {host.image}.qcow2 there)")
    if base not in seen:
        info = qemu_info(base)
        if info.get("format") == "qcow2":
            # a truncated or damaged base would give every overlay a broken disk
            qemu_check(base, "rebuild it with `invoke base-image` (it fetches or builds "
                             "again an image that differs from the manifest)")
        seen[base] = (info, _base_sha(base, manifest))
    info, sha = seen[base]
    fmt = info.get("format")
    if fmt != "qcow2":
        raise LabError(f"{where}.image: {base} is {fmt}, not qcow2; convert it with "
                       f"`qemu-img convert -O qcow2 {base.name} ...` or rebuild it with "
                       "`invoke base-image`")
    vsize = int(info["virtual-size"])
    if host.disk * GiB < vsize:
        raise LabError(f"{where}.disk: {host.disk} GiB is smaller than the base image "
                       f"{base.name} ({vsize / GiB:.1f} GiB); set it to at least "
                       f"{-(-vsize // GiB)}")
    return base, info, sha


def _base_sha(base: Path, manifest: Manifest) -> str:
    """The base's sha256: from the manifest when the file is intact, else hashed."""
    rec = manifest.get(base)
    if rec is not None and manifest.intact(base, rec):
        return rec["sha256"]
    return sha256_file(base)


class Overlays(Builder):
    """One overlay per host; the reference port of the builder contract."""

    name = "overlays"
    kind = "overlay"
    help = "qcow2 overlay per host"
    needs = ("base-image",)

    def outputs(self, lab: Lab, ws: Workspace, *, hosts: list[str] | None = None,
                **_) -> list[Output]:
        names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
        chosen = [lab.host(n) for n in names]
        if not chosen:
            raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to do")
        extcmd.require("qemu-img")
        manifest = Manifest(ws.artifacts)
        outs = []
        seen: dict[Path, tuple[dict, str]] = {}     # each base is inspected and hashed once
        for h in chosen:
            base, info, sha = _check_base(lab, ws, h, manifest, seen)
            # only this host's own settings and the base's content, with the
            # host's identity: first boot writes it into the disk (cloud-init
            # state, network config), so a new address means a fresh disk
            outs.append(Output(overlay_path(ws, h), self.kind, f"overlay {h.name}",
                               inputs=(h.name, h.image, h.disk, sha, str(h.ip), h.mac, h.network),
                               data=(h, base, sha)))
        return outs

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        """A VM's writes make an overlay differ from its record: that is use,
        not damage.  A used overlay whose inputs changed is refused without
        --force (runs with --force never ask)."""
        target = out.path
        if not target.exists():
            return None
        rec = ctx.manifest.get(target)
        used = written_bytes(target)
        same = rec is not None and rec.get("input_digest") == digest
        if same and (used or ctx.manifest.intact(target, rec)):
            return f"a VM has written {used / 2**20:.0f} MiB, kept" if used else ""
        if used:
            _, _, sha = out.data
            why = "its base image changed" if rec and rec.get("meta", {}).get(
                "backing_sha256") != sha else "its settings changed"
            raise LabError(f"{target}: a VM has written {used / 2**20:.0f} MiB to this overlay "
                           f"and {why}; it holds that VM's data: rerun with --force to discard "
                           "it and start from the base image")
        return None

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        h, base, sha = out.data
        target = out.path
        backing = os.path.relpath(base, target.parent)
        tmp = stage.file(target)
        create_overlay(tmp, backing, size=f"{h.disk}G", cwd=target.parent, what=f"creating {target.name}")
        chain = [target.name, *check_chain(tmp, base, h.disk * GiB)[1:]]
        return Built(f"{h.disk} GiB, backed by {base.name}",
                     meta={"host": h.name, "backing": backing, "backing_format": "qcow2",
                           "backing_sha256": sha, "virtual_size": h.disk * GiB, "chain": chain},
                     tools={"qemu-img": extcmd.tool_version("qemu-img")})


OVERLAYS = Overlays()


def build_overlays(lab: Lab, ws: Workspace, *, hosts: list[str] | None = None,
                   force: bool = False) -> list[Outcome]:
    """Create the overlay of each host (default: all); see the module doc."""
    return run(OVERLAYS, lab, ws, force=force, hosts=hosts)
