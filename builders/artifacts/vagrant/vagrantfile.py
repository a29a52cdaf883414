"""The lab's Vagrantfile (``artifacts/vagrant/Vagrantfile``): one machine per
lab host, on the lab networks whose libvirt XML (``networks/<name>.xml``,
made by builders.tools.libvirt) is defined with ``virsh net-define`` and
started with ``virsh net-start`` before ``vagrant up``; each machine gets
its cloud-init seed ISO as a cdrom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builders.artifacts import seed
from builders.artifacts.vagrant.catalog import catalog_path
from builders.core.lab import Host, Lab, Nic
from builders.core.workspace import Workspace
from builders.tools.qemu_vm import detect_accel

VAGRANTFILE_KIND = "vagrantfile"


def _rb(value: Any) -> str:
    """A Ruby literal: strings double-quoted with escapes, numbers/bools as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    s = str(value)
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{s}"'


def seed_iso_path(lab: Lab, ws: Workspace, host: Host) -> Path:
    """Where the seed ISO builder writes a host's cloud-init seed: the seed
    builder's own answer (artifacts/seed/, or certs/seed/ for a seed that
    carries certs/ material).  Always the ISO: vagrant-libvirt attaches a
    file given by absolute path only as a cdrom or floppy, and a vfat seed
    (.img) cannot be mounted from a cdrom (512-byte FAT sectors on a
    2048-byte device)."""
    return seed.seed_path(lab, ws, host, fmt="iso")


def vfat_only_hosts(lab: Lab, ws: Workspace) -> list[str]:
    """Hosts whose seed exists only as a vfat image, which the Vagrantfile
    cannot attach (see seed_iso_path)."""
    return [h.name for h in lab.hosts
            if not seed_iso_path(lab, ws, h).exists()
            and seed.seed_path(lab, ws, h, fmt="vfat").exists()]


def ssh_private_key(lab: Lab, ws: Workspace) -> Path | None:
    """The lab's SSH key for Vagrant: lab.yaml vagrant.ssh_private_key, else the
    one private key under certs/ssh/ (the key the seed ISOs authorise)."""
    if lab.vagrant.ssh_private_key:
        return lab.path(lab.vagrant.ssh_private_key)
    d = ws.certs / "ssh"
    if not d.is_dir():
        return None
    keys = sorted(p for p in d.iterdir()
                  if p.is_file() and p.suffix != ".pub" and p.with_name(p.name + ".pub").exists())
    return keys[0] if len(keys) == 1 else None


def _seed_where(lab: Lab, ws: Workspace, host: Host) -> str:
    base = "certs" if seed.is_secret(lab, ws, host) else "artifacts"
    return f"{base}/seed/{host.name}.iso"


def management_nic(lab: Lab, h: Host) -> Nic | None:
    """The host's NIC that is Vagrant's management NIC: its first NIC when the
    host has several and that one's network has DHCP (the default lab's NAT
    network); None: Vagrant's own management network."""
    if len(h.nics) < 2 or not h.nics[0].mac:
        return None
    return h.nics[0] if lab.network(h.nics[0].network).dhcp else None


def vagrant_driver(lab: Lab, ws: Workspace) -> str:
    """libvirt's domain type for Vagrant: vagrant.driver, or (auto) kvm where
    KVM runs a guest here and qemu (TCG) where it cannot, as boot-check decides."""
    if lab.vagrant.driver != "auto":
        return lab.vagrant.driver
    return "kvm" if detect_accel(ws) == "kvm" else "qemu"


def render_vagrantfile(lab: Lab, ws: Workspace, *, with_catalog: bool = False) -> str:
    """The Vagrantfile; ``config.vm.box_url`` names the box catalog when it
    exists or is being built in the same run (``with_catalog``)."""
    driver = vagrant_driver(lab, ws)
    box = lab.vagrant.box
    cat = catalog_path(ws, box)
    key = ssh_private_key(lab, ws)
    out = [
        f"# Vagrantfile of lab {lab.name}, made by labforge from {lab.source.name}.",
        "# Do not edit: change lab.yaml and run `invoke vagrantfile`.",
        "#",
        "# Bring the lab up, in this directory (the host needs vagrant, vagrant-libvirt,",
        "# libvirt-daemon-system, dnsmasq-base and a storage pool named default):",
    ]
    for net in lab.networks:
        out.append(f"#   virsh net-define networks/{net.name}.xml && virsh net-start {net.name}")
    out += [
        "#   vagrant up --provider=libvirt",
        "#   invoke lab-check --wait 300       # labforge: names, ZooKeeper over TLS, client auth",
        "# and down: `vagrant destroy -f` removes the machines, their volumes and the",
        "# networks above (define them again before the next `vagrant up`).",
        f"# libvirt.driver {driver!r}: "
        + ("vagrant.driver in lab.yaml" if lab.vagrant.driver != "auto" else
           "KVM runs guests where this file was made" if driver == "kvm" else
           "KVM cannot run guests where this file was made (TCG); vagrant.driver overrides"),
        "",
        'Vagrant.configure("2") do |config|',
        f"  config.vm.box = {_rb(box)}",
    ]
    if with_catalog or cat.exists():
        out.append(f"  config.vm.box_url = {_rb(cat.resolve().as_uri())}")
    out += [
        '  config.vm.synced_folder ".", "/vagrant", disabled: true',
        f"  config.ssh.username = {_rb(lab.user.name)}",
    ]
    if key is not None:
        out += [f"  config.ssh.private_key_path = {_rb(key.resolve())}",
                "  config.ssh.insert_key = false"]
    out += [
        "",
        "  config.vm.provider :libvirt do |libvirt|",
        f"    libvirt.driver = {_rb(driver)}",
        f"    libvirt.management_network_name = {_rb(lab.vagrant.management_network)}",
        "  end",
    ]
    for h in lab.hosts:
        seed = seed_iso_path(lab, ws, h).resolve()
        mgmt = management_nic(lab, h)
        nets = []
        for nic in h.nics:
            if nic is mgmt:
                continue
            net = lab.network(nic.network) if nic.network else lab.host_network(h)
            opts = [f"ip: {_rb(str(nic.ip))}", f"netmask: {_rb(str(net.cidr.netmask))}",
                    f"libvirt__network_name: {_rb(net.name)}",
                    f"libvirt__dhcp_enabled: {_rb(net.dhcp)}",
                    f"libvirt__forward_mode: {_rb(net.forward)}"]
            if nic.mac:
                opts.append(f"mac: {_rb(nic.mac.lower())}")
            # the seed ISO's network-config sets the lab address; Vagrant configures
            # the NIC itself only when there is no seed
            opts.append("auto_config: !File.exist?(seed)")
            nets += ["    m.vm.network :private_network,",
                     *[f"      {o}," for o in opts[:-1]], f"      {opts[-1]}"]
        provider = []
        if mgmt is not None:
            # Vagrant's management NIC is the host's first lab NIC: that network,
            # found by its subnet, this MAC (the seed matches the NIC by it; the
            # network's DHCP reserves the lab address for it)
            mnet = lab.network(mgmt.network)
            provider = [f"      libvirt.management_network_name = {_rb(mnet.name)}",
                        f"      libvirt.management_network_address = {_rb(str(mnet.cidr))}",
                        f"      libvirt.management_network_mac = {_rb(mgmt.mac.lower())}"]
        out += [
            "",
            f"  config.vm.define {_rb(h.name)} do |m|",
            f"    seed = {_rb(str(seed))}",
            # the seed names the machine (and writes /etc/hosts); Vagrant's own
            # hostname change would map the name to 127.0.1.1 and restart NICs
            f"    m.vm.hostname = {_rb(lab.fqdn(h) if lab.domain else h.name)} "
            "unless File.exist?(seed)",
            *nets,
            "    m.vm.provider :libvirt do |libvirt|",
            *provider,
            f"      libvirt.cpus = {h.cpus}",
            f"      libvirt.memory = {h.memory}",
            f"      libvirt.machine_virtual_size = {h.disk}",
            f"      # cloud-init NoCloud seed ({_seed_where(lab, ws, h)}) as a cdrom",
            "      libvirt.storage :file, device: :cdrom, path: seed if File.exist?(seed)",
            "    end",
            "  end",
        ]
    out += ["end", ""]
    return "\n".join(out)


def vagrant_dir(ws: Workspace) -> Path:
    return ws.artifacts / "vagrant"




def network_commands(lab: Lab, ws: Workspace) -> list[str]:
    """The virsh commands that create the lab networks from the rendered XML."""
    cmds = []
    for net in lab.networks:
        xml = vagrant_dir(ws) / "networks" / f"{net.name}.xml"
        cmds += [f"virsh net-define {xml}", f"virsh net-start {net.name}",
                 f"virsh net-autostart {net.name}"]
    return cmds

