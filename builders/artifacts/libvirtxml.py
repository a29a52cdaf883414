"""libvirt XML for users who run virsh instead of Vagrant.

For each host: ``artifacts/libvirt/<host>.xml`` (a domain: disk = the
host's overlay, cdrom = its seed ISO, one NIC on its lab network with its
MAC, serial console) and ``artifacts/libvirt/<host>-volume.xml`` (the
overlay as a storage volume backed by the base, for ``virsh vol-create``);
for each lab network ``artifacts/libvirt/net-<network>.xml``.  Paths are
absolute (libvirt requires it).  Use::

    virsh net-define artifacts/libvirt/net-private.xml && virsh net-start private
    virsh define artifacts/libvirt/broker1.xml && virsh start kafka-lab-broker1

The files are checked with ``virt-xml-validate`` when it is installed.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from builders.core import extcmd
from builders.checks.bootcheck import detect_accel
from builders.core.errors import LabError
from builders.core.fsutil import atomic_path
from builders.core.lab import Host, Lab, Network
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.artifacts.overlays import base_path, overlay_path
from builders.core.workspace import BuildLock, Workspace


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def bridge_name(net: Network) -> str:
    return net.bridge or f"lf-{net.name}"[:15]


def network_xml(net: Network) -> str:
    root = ET.Element("network")
    _sub(root, "name", net.name)
    if net.forward == "nat":
        _sub(root, "forward", mode="nat")
    _sub(root, "bridge", name=bridge_name(net), stp="on", delay="0")
    if net.gateway is not None:
        ip = _sub(root, "ip", address=str(net.gateway), netmask=str(net.cidr.netmask))
        if net.dhcp:
            hosts = list(net.cidr.hosts())
            dhcp = _sub(ip, "dhcp")
            _sub(dhcp, "range", start=str(hosts[len(hosts) // 2]), end=str(hosts[-1]))
    return _xml(root)


def domain_xml(lab: Lab, host: Host, overlay: Path, seed: Path | None, accel: str) -> str:
    net = lab.network(host.network) if host.network else lab.networks[0]
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


def _seed_path(lab: Lab, ws: Workspace, host: Host) -> Path | None:
    try:
        from builders.artifacts import seediso
    except ImportError:  # pragma: no cover - the seed module is another feature
        return None
    return seediso.seed_path(lab, ws, host).resolve()


def validate(path: Path, kind: str) -> None:
    """virt-xml-validate PATH KIND, when the tool is installed."""
    if shutil.which("virt-xml-validate") is None:
        return
    extcmd.run(["virt-xml-validate", path, kind], what=f"validating {path.name}")


def build_libvirt_xml(lab: Lab, ws: Workspace, *, hosts: list[str] | None = None,
                      force: bool = False, accel: str | None = None) -> list[Outcome]:
    """Write the domain, volume and network XML (see the module doc)."""
    names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
    chosen = [lab.host(n) for n in names]
    if not chosen:
        raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to do")
    accel = accel or detect_accel(ws)     # domain type kvm or qemu
    out_dir = ws.artifacts / "libvirt"
    manifest = Manifest(ws.artifacts)
    outcomes: list[Outcome] = []
    with BuildLock(ws):
        jobs: list[tuple[str, Path, str, str]] = []     # (step, path, xml, schema)
        used_nets = {n.network for h in chosen for n in h.nics}
        for net in lab.networks:
            if net.name in used_nets:
                jobs.append((f"libvirt-xml network {net.name}", out_dir / f"net-{net.name}.xml",
                             network_xml(net), "network"))
        for h in chosen:
            overlay = overlay_path(ws, h).resolve()
            seed = _seed_path(lab, ws, h)
            jobs.append((f"libvirt-xml {h.name}", out_dir / f"{h.name}.xml",
                         domain_xml(lab, h, overlay, seed, accel), "domain"))
            jobs.append((f"libvirt-xml {h.name} volume", out_dir / f"{h.name}-volume.xml",
                         volume_xml(h, overlay, base_path(ws, h).resolve()), "storagevol"))
        for step, path, text, schema in jobs:
            digest = input_digest("libvirt-xml", text)
            if not force and manifest.is_current(path, digest):
                outcomes.append(Outcome(step, "up to date", [path]))
                continue
            with atomic_path(path) as tmp:
                tmp.write_text(text)
                validate(tmp, schema)
            manifest.record(path, "libvirt-xml", digest,
                            tools={"virt-xml-validate": extcmd.tool_version("virt-xml-validate")},
                            meta={"schema": schema})
            outcomes.append(Outcome(step, "built", [path]))
    return outcomes
