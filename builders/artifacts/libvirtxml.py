"""libvirt XML for users who run virsh instead of Vagrant.

For each host: ``artifacts/libvirt/<host>.xml`` (a domain: disk = the
host's overlay, cdrom = its seed ISO, one NIC on its lab network with its
MAC, serial console) and ``artifacts/libvirt/<host>-volume.xml`` (the
overlay as a storage volume backed by the base, for ``virsh vol-create``);
for each lab network ``artifacts/libvirt/net-<network>.xml`` (made by
builders.tools.libvirt, the same bytes and manifest kind as the
Vagrantfile's network XML).  Paths are
absolute (libvirt requires it).  Use::

    virsh net-define artifacts/libvirt/net-private.xml && virsh net-start private
    virsh define artifacts/libvirt/broker1.xml && virsh start kafka-lab-broker1

The files are checked with ``virt-xml-validate`` when it is installed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from builders.core import extcmd
from builders.tools.qemu_vm import detect_accel
from builders.core.errors import LabError
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.lab import Host, Lab
from builders.core.outcome import Outcome
from builders.artifacts.overlays import base_path, overlay_path
from builders.artifacts.seed import seed_path
from builders.core.workspace import Workspace
from builders.tools import libvirt


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def domain_xml(lab: Lab, host: Host, overlay: Path, seed: Path | None, accel: str) -> str:
    net = lab.host_network(host)
    root = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    _sub(root, "name", f"{lab.name}-{host.name}")
    _sub(root, "memory", str(host.memory), unit="MiB")
    _sub(root, "vcpu", str(host.cpus))
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "boot", dev="hd")
    feats = _sub(root, "features")
    _sub(feats, "acpi")
    _sub(feats, "apic")
    if accel == "kvm":
        _sub(root, "cpu", mode="host-passthrough")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    dev = _sub(root, "devices")
    disk = _sub(dev, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=str(overlay))
    _sub(disk, "target", dev="vda", bus="virtio")
    if seed is not None:
        cd = _sub(dev, "disk", type="file", device="cdrom")
        _sub(cd, "driver", name="qemu", type="raw")
        _sub(cd, "source", file=str(seed))
        _sub(cd, "target", dev="hdc", bus="ide")
        _sub(cd, "readonly")
    for lab_nic in host.nics or ():          # every lab NIC, in the host's order
        nic = _sub(dev, "interface", type="network")
        if lab_nic.mac:
            _sub(nic, "mac", address=lab_nic.mac.lower())
        _sub(nic, "source", network=lab_nic.network or net.name)
        _sub(nic, "model", type="virtio")
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(dev, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    return _xml(root)


def volume_xml(host: Host, overlay: Path, base: Path) -> str:
    root = ET.Element("volume", type="file")
    _sub(root, "name", overlay.name)
    _sub(root, "capacity", str(host.disk), unit="GiB")
    target = _sub(root, "target")
    _sub(target, "format", type="qcow2")
    backing = _sub(root, "backingStore")
    _sub(backing, "path", str(base))
    _sub(backing, "format", type="qcow2")
    return _xml(root)


class LibvirtXml(Builder):
    """Domain, volume and network XML for virsh users (see the module doc);
    every file is checked with virt-xml-validate before it is committed."""

    kind = "libvirt-xml"
    help = "libvirt domain, volume and network XML per host (for virsh users)"

    def outputs(self, lab: Lab, ws: Workspace, *, hosts: list[str] | None = None,
                accel: str | None = None, **_) -> list[Output]:
        names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
        chosen = [lab.host(n) for n in names]
        if not chosen:
            raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to do")
        libvirt.check_networks(lab)
        accel = accel or detect_accel(ws)     # domain type kvm or qemu
        out_dir = ws.artifacts / "libvirt"
        outs: list[Output] = []
        used_nets = {n.network for h in chosen for n in h.nics}
        for net in lab.networks:
            if net.name in used_nets:
                text = libvirt.network_xml(lab, net)
                outs.append(Output(out_dir / f"net-{net.name}.xml", libvirt.NETWORK_KIND,
                                   f"libvirt-xml network {net.name}", inputs=(text,),
                                   data=(text, "network")))
        for h in chosen:
            overlay = overlay_path(ws, h).resolve()
            text = domain_xml(lab, h, overlay, seed_path(lab, ws, h).resolve(), accel)
            outs.append(Output(out_dir / f"{h.name}.xml", self.kind, f"libvirt-xml {h.name}",
                               inputs=(text,), data=(text, "domain")))
            text = volume_xml(h, overlay, base_path(ws, h).resolve())
            outs.append(Output(out_dir / f"{h.name}-volume.xml", self.kind,
                               f"libvirt-xml {h.name} volume", inputs=(text,),
                               data=(text, "storagevol")))
        return outs

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        text, schema = out.data
        tmp = stage.file(out.path)
        tmp.write_text(text)
        libvirt.validate(tmp, schema)
        return Built(meta={"schema": schema},
                     tools={"virt-xml-validate": extcmd.tool_version("virt-xml-validate")})


LIBVIRT_XML = LibvirtXml()


def build_libvirt_xml(lab: Lab, ws: Workspace, *, hosts: list[str] | None = None,
                      force: bool = False, accel: str | None = None) -> list[Outcome]:
    """Write the domain, volume and network XML (see the module doc)."""
    return run(LIBVIRT_XML, lab, ws, force=force, hosts=hosts, accel=accel)
