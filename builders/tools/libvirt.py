"""libvirt network XML: one generator and one set of rules.

Both the ``libvirt-xml`` builder (``artifacts/libvirt/net-<net>.xml``, for
virsh users) and the ``vagrantfile`` builder
(``artifacts/vagrant/networks/<net>.xml``, defined before ``vagrant up``)
write a lab network with :func:`network_xml`, so the two files of a network
are the same bytes and are recorded under the same manifest kind,
:data:`NETWORK_KIND`.

The rules:

- **Bridge name**: ``networks.X.bridge`` when lab.yaml gives one (the lab
  model refuses a name longer than 15 characters, Linux's IFNAMSIZ limit);
  else ``lf-<network>``.  When ``lf-<network>`` would be longer than 15
  characters it is shortened deterministically to ``lf-`` + the network
  name's first 7 characters + ``-`` + 4 hex digits of the name's sha256
  (``kafka-replication`` -> ``lf-kafka-r-1c2e``): the same lab always gives
  the same bridge, and two long names with the same start still get
  different bridges.  Two networks with the same bridge are an error
  naming ``networks.X.bridge``.
- **Gateway** (the bridge's host side address): ``networks.X.gateway``, else
  the network's first address, which then must not be a host's address.
- **DHCP** only with ``dhcp: true``: the upper half of the network (from
  the middle address to the one before broadcast), which must hold no
  host's static address, and a reservation (``<host mac name ip>``) of
  each NIC's lab address for its MAC.
- **Forward**: ``nat`` or none (isolated); an isolated network without DHCP
  runs no dnsmasq at all (``<dns enable="no"/>``).
"""

from __future__ import annotations

import hashlib
import shutil
import xml.etree.ElementTree as ET
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from builders.core import extcmd
from builders.core.errors import LabError
from builders.core.lab import Host, Lab, Network, Nic

NETWORK_KIND = "libvirt-network"       # manifest kind of a network XML file, whoever writes it
IFNAMSIZ = 15                          # Linux interface names: at most 15 characters
BRIDGE_PREFIX = "lf-"


def bridge_name(net: Network) -> str:
    """The Linux bridge of a lab network (see the module doc for the rule)."""
    if net.bridge:
        return net.bridge
    name = f"{BRIDGE_PREFIX}{net.name}"
    if len(name) <= IFNAMSIZ:
        return name
    tag = hashlib.sha256(net.name.encode()).hexdigest()[:4]
    keep = IFNAMSIZ - len(BRIDGE_PREFIX) - 1 - len(tag)
    return f"{BRIDGE_PREFIX}{net.name[:keep]}-{tag}"


def gateway(lab: Lab, net: Network) -> IPv4Address:
    """The host side address of the network's bridge."""
    if net.gateway is not None:
        return net.gateway
    gw = next(net.cidr.hosts())
    users = [f for f, ip in addresses_on(lab, net) if ip == gw]
    if users:
        raise LabError(f"{lab.source.name}: networks.{net.name}.gateway: not given, and the "
                       f"default {gw} is {users[0]}; set networks.{net.name}.gateway")
    return gw


def dhcp_range(lab: Lab, net: Network) -> tuple[IPv4Address, IPv4Address]:
    """The upper half of the network, which must hold no static address."""
    cidr: IPv4Network = net.cidr
    start = cidr.network_address + cidr.num_addresses // 2
    end = cidr.broadcast_address - 1
    for field, ip in addresses_on(lab, net):
        if start <= ip <= end:
            raise LabError(f"{lab.source.name}: {field}: {ip} is in the DHCP range "
                           f"{start}-{end} of network {net.name}; use an address below {start} "
                           "or dhcp: false")
    return start, end


def nics_on(lab: Lab, net: Network) -> list[tuple[Host, int, Nic]]:
    """(host, index, NIC) of every NIC on the network, in lab order."""
    return [(h, i, n) for h in lab.hosts for i, n in enumerate(h.nics) if n.network == net.name]


def addresses_on(lab: Lab, net: Network) -> list[tuple[str, IPv4Address]]:
    """(field, address) of every NIC on the network: none may be the default
    gateway or in the DHCP range."""
    return [(f"hosts.{h.name}.ip" if len(h.nics) == 1 else f"hosts.{h.name}.nics[{i}].ip", n.ip)
            for h, i, n in nics_on(lab, net)]


def dhcp_hosts(lab: Lab, net: Network) -> list[tuple[str, str, IPv4Address]]:
    """(mac, host name, address): a DHCP network reserves each NIC's lab
    address for its MAC."""
    if not net.dhcp:
        return []
    return [(n.mac.lower(), h.name, n.ip) for h, _, n in nics_on(lab, net) if n.mac]


def check_networks(lab: Lab) -> None:
    """Every rule above, for every network of the lab, before anything is written."""
    seen: dict[str, str] = {}
    for net in lab.networks:
        bridge = bridge_name(net)
        if bridge in seen:
            raise LabError(f"{lab.source.name}: networks.{net.name}.bridge: {bridge} is also the "
                           f"bridge of network {seen[bridge]}; set networks.{net.name}.bridge "
                           "to another name")
        seen[bridge] = net.name
        gateway(lab, net)
        if net.dhcp:
            dhcp_range(lab, net)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def network_xml(lab: Lab, net: Network) -> str:
    """libvirt network XML: a bridge whose host side has the gateway address;
    DHCP only when the lab asks for it; NAT or fully isolated."""
    root = ET.Element("network")
    _sub(root, "name", net.name)
    _sub(root, "bridge", name=bridge_name(net), stp="on", delay="0")
    if net.forward == "nat":
        _sub(root, "forward", mode="nat")
    if not net.dhcp and net.forward == "none":
        # static addresses and no way out: no dnsmasq needed at all
        _sub(root, "dns", enable="no")
    ip = _sub(root, "ip", address=str(gateway(lab, net)), netmask=str(net.cidr.netmask))
    if net.dhcp:
        start, end = dhcp_range(lab, net)
        dhcp = _sub(ip, "dhcp")
        _sub(dhcp, "range", start=str(start), end=str(end))
        for mac, name, addr in dhcp_hosts(lab, net):
            _sub(dhcp, "host", mac=mac, name=name, ip=str(addr))
    ET.indent(root)
    # no names in the comment: a DNS label may hold "--", which ends an XML comment
    return ("<!-- a lab network made by labforge: define it with `virsh net-define FILE`,\n"
            "     then `virsh net-start NAME` (NAME: the <name> below) -->\n"
            + ET.tostring(root, encoding="unicode") + "\n")


def validate(path: Path, schema: str) -> None:
    """``virt-xml-validate PATH SCHEMA`` (network, domain, storagevol...), when installed."""
    if shutil.which("virt-xml-validate") is None:
        return
    extcmd.run(["virt-xml-validate", path, schema], what=f"validating {path.name}")
