"""How the lab's NICs meet libvirt and Vagrant (shared by the network XML,
the Vagrantfile and the libvirt domain XML).

- A host's **management NIC** is its first NIC when that NIC's network has
  DHCP (the default lab's NAT network ``public``): Vagrant's management
  network is then that lab network (adapter 0, found by subnet, matched by
  the NIC's MAC), and the network's DHCP hands the NIC its lab address as a
  reservation for the MAC.  Other hosts keep Vagrant's own management
  network (``vagrant.management_network``) and get every NIC as a private
  network.
- A network with DHCP carries a ``<host mac= name= ip=>`` reservation for
  every NIC on it.
- **Driver**: ``vagrant.driver`` (kvm, qemu), or ``auto``: kvm where KVM
  can run guests here, qemu (TCG) where it cannot, decided as boot-check
  decides.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from builders.core.lab import Host, Lab, Network, Nic


def nics_on(lab: Lab, net: Network) -> list[tuple[Host, int, Nic]]:
    """(host, index, NIC) of every NIC on the network, in lab order."""
    return [(h, i, n) for h in lab.hosts for i, n in enumerate(h.nics) if n.network == net.name]


def addresses_on(lab: Lab, net: Network) -> list[tuple[str, IPv4Address]]:
    """(field, address) of every NIC on the network, for the checks that an
    address is not the default gateway nor in the DHCP range."""
    out = []
    for h, i, n in nics_on(lab, net):
        field = f"hosts.{h.name}.ip" if len(h.nics) == 1 else f"hosts.{h.name}.nics[{i}].ip"
        out.append((field, n.ip))
    return out


def dhcp_hosts(lab: Lab, net: Network) -> list[tuple[str, str, IPv4Address]]:
    """(mac, host name, address) reservations of a DHCP network."""
    if not net.dhcp:
        return []
    return [(n.mac.lower(), h.name, n.ip) for h, _, n in nics_on(lab, net) if n.mac]


def management_nic(lab: Lab, h: Host) -> Nic | None:
    """The host's NIC that is Vagrant's management NIC, if one of its lab NICs is."""
    if len(h.nics) < 2 or not h.nics[0].mac:
        return None
    return h.nics[0] if lab.network(h.nics[0].network).dhcp else None


def vagrant_driver(lab: Lab, ws) -> str:
    """libvirt's domain type for Vagrant: vagrant.driver, or kvm/qemu as
    boot-check decides (kvm only where KVM really runs a guest here)."""
    if lab.vagrant.driver != "auto":
        return lab.vagrant.driver
    from builders.checks.bootcheck import detect_accel
    return "kvm" if detect_accel(ws) == "kvm" else "qemu"
