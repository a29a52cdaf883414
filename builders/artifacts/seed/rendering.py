"""Rendering one host's seed files from lab.yaml: ``meta-data``,
``user-data``, ``network-config`` (and ``vendor-data`` when lab.yaml names
one), as bytes, in the order they go on the seed.

- meta-data: ``instance-id`` (host name + a digest of the seed's content, so
  a changed seed is a new instance to cloud-init) and ``local-hostname``;
- network-config v2: DHCP kept on the first NIC (by its kernel name), the
  lab NIC static, matched by MAC (and renamed) when lab.yaml gives
  ``hosts.X.mac``, else by interface name;
- user-data ``#cloud-config``: hostname, fqdn, /etc/hosts, the default user
  with SSH keys, write_files (base64), packages, runcmd, and last a runcmd
  entry printing the seed marker to the serial console.

A host may name its own user-data / network-config / vendor-data files; they
are validated (builders.artifacts.seed.validate) and used as is.  Nothing
here writes a file.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builders.artifacts.seed.validate import (CERTS_PREFIX, SSH_KEY, certs_source, check_generated,
                                              check_source_place,
                                              check_size, is_secret, public_keys, read_source,
                                              validate_network_config, validate_user_data, where)
from builders.artifacts import kafka_node
from builders.core.errors import LabError
from builders.core.lab import Host, Lab
from builders.core.manifest import input_digest
from builders.core.workspace import Workspace

GENERATOR = "labforge-seed/1"            # bump when generated content changes shape
VOLUME_ID = "cidata"                     # the volume label cloud-init's NoCloud looks for
LAB_KEY = ("ssh", "lab_ed25519.pub")     # made by `invoke certs`
ORDER = ("meta-data", "network-config", "user-data", "vendor-data")   # files on a seed


@dataclass
class Seed:
    """The rendered content of one host's seed (not yet an ISO)."""
    host: str
    files: dict[str, bytes]                 # seed file name -> bytes, in ORDER
    instance_id: str
    marker: str
    secret: bool                            # carries material from certs/
    generated_user_data: bool               # False: the host's own user-data file
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def host_of(lab: Lab, host: Host | str) -> Host:
    return host if isinstance(host, Host) else lab.host(host)


# libyaml's emitter when PyYAML has it (10x faster); tests check that both
# emitters give the same text for what labforge generates
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(data: Any, dumper: type = DUMPER) -> str:
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False,
                     width=1 << 20, allow_unicode=True)


def _ssh_keys(lab: Lab, ws: Workspace, h: Host) -> list[str]:
    """The host's authorized keys, in lab.yaml order: key files (relative to
    the lab file) or keys given inline; default: the lab key from `invoke certs`."""
    sources: list[tuple[str, Path | None, str]] = []    # (field, file, inline key)
    if not h.ssh_authorized_keys:
        path = ws.certs.joinpath(*LAB_KEY)
        if not path.is_file():
            raise LabError(f"{where(lab, f'hosts.{h.name}')}: no SSH key ({path} not found): "
                           f"run `invoke certs` first or set hosts.{h.name}.ssh_authorized_keys")
        sources.append((str(path), path, ""))
    for i, entry in enumerate(h.ssh_authorized_keys):
        at = f"hosts.{h.name}.ssh_authorized_keys[{i}]"
        if SSH_KEY.match(entry.strip()):
            sources.append((at, None, entry.strip()))
        else:
            path = lab.path(entry)
            read_source(lab, path, at, "fix the path or create the key (ssh-keygen -t ed25519)")
            sources.append((at, path, ""))
    keys: list[str] = []
    for at, path, inline in sources:
        keys.extend([inline] if path is None else public_keys(lab, path, at))
    return keys


def _write_files(lab: Lab, ws: Workspace, h: Host) -> list[dict]:
    out = []
    for i, wf in enumerate(h.write_files):
        at = f"hosts.{h.name}.write_files[{i}].source"
        if wf.source is not None:
            if wf.source.startswith(CERTS_PREFIX):
                path = certs_source(lab, ws, wf.source, at)
                data = read_source(lab, path, at, "run `invoke certs` first or fix the name")
            else:
                path = lab.path(wf.source)
                check_source_place(lab, ws, wf.source, path, at)
                data = read_source(lab, path, at, "fix the path")
        else:
            data = (wf.content or "").encode()
        perms = wf.permissions if len(wf.permissions) == 4 else "0" + wf.permissions
        entry = {
            "path": wf.path,
            "encoding": "b64",
            "content": base64.b64encode(data).decode(),
            "owner": wf.owner,
            "permissions": perms,
        }
        # an owner other than root may only exist after `packages` ran: write
        # such files in cloud-init's final stage (after users and packages)
        if any(part not in ("root", "0", "") for part in wf.owner.split(":")):
            entry["defer"] = True
        out.append(entry)
    return out


def _marker_cmd(marker: str) -> list[str]:
    # list form: run without a shell by cloud-init; the shell here only loops
    # over the consoles so that a missing one does not stop the others
    script = ("m='%s'; echo \"$m\"; for d in /dev/ttyS0 /dev/console; do "
              "[ -e \"$d\" ] && { echo \"$m\" > \"$d\"; } 2>/dev/null; done; true" % marker)
    return ["sh", "-c", script]


def _nic_name(i: int, nic) -> str:
    """A NIC's name in the guest: hosts.X.nics[i].name, else its network's
    name when that is a valid interface name, else lab<i>."""
    if nic.name:
        return nic.name
    return nic.network if len(nic.network) <= 15 else f"lab{i}"


def _nics_config(lab: Lab, h: Host) -> dict:
    """network-config of a host with several NICs: each matched by MAC (the
    guest names NICs ens5, ens6, ... in PCI order, which a seed cannot know)
    and renamed; DHCP on a network with DHCP (its address is the network's
    reservation for the MAC: Vagrant finds the VM by that lease), static
    elsewhere."""
    ethernets: dict[str, Any] = {}
    for i, nic in enumerate(h.nics):
        net = lab.network(nic.network)
        cfg: dict[str, Any] = {"match": {"macaddress": nic.mac.lower()},
                               "set-name": _nic_name(i, nic)}
        if net.dhcp:
            cfg["dhcp4"] = True
        else:
            cfg["dhcp4"] = False
            cfg["addresses"] = [f"{nic.ip}/{net.cidr.prefixlen}"]
            if net.forward == "nat" and net.gateway is not None:
                cfg["routes"] = [{"to": "0.0.0.0/0", "via": str(net.gateway), "metric": 200}]
                cfg["nameservers"] = {"addresses": [str(net.gateway)],
                                      **({"search": [lab.domain]} if lab.domain else {})}
        ethernets[_nic_name(i, nic)] = cfg
    return {"version": 2, "ethernets": ethernets}


def network_config(lab: Lab, h: Host) -> dict:
    if len(h.nics) > 1:
        return _nics_config(lab, h)
    net = lab.host_network(h)
    lab_nic: dict[str, Any] = {}
    if h.mac:
        # matched by MAC and renamed: cloud-init writes the rename (udev rule /
        # set-name) for every renderer, so the name is known in the guest
        name = h.interface or "lab0"
        lab_nic["match"] = {"macaddress": h.mac.lower()}
        lab_nic["set-name"] = name
    else:
        # cloud-init's eni and networkd renderers use the id as the name
        name = h.interface or "eth1"
    lab_nic["dhcp4"] = False
    lab_nic["addresses"] = [f"{h.ip}/{net.cidr.prefixlen}"]
    if net.forward == "nat" and net.gateway is not None:
        # the lab network routes out: a default route, below a DHCP NIC's one
        lab_nic["routes"] = [{"to": "0.0.0.0/0", "via": str(net.gateway), "metric": 200}]
        lab_nic["nameservers"] = {"addresses": [str(net.gateway)],
                                  **({"search": [lab.domain]} if lab.domain else {})}
    ethernets: dict[str, Any] = {}
    if h.dhcp_interface:
        ethernets[h.dhcp_interface] = {"dhcp4": True}
    ethernets[name] = lab_nic
    return {"version": 2, "ethernets": ethernets}


def _user_data(lab: Lab, ws: Workspace, h: Host) -> dict:
    cfg: dict[str, Any] = {"hostname": h.name}
    fqdn = lab.fqdn(h)
    if fqdn != h.name:
        cfg["fqdn"] = fqdn
    # the node configuration writes /etc/hosts with every lab host (and the
    # node's own name at its lab address, never 127.0.1.1)
    cfg["manage_etc_hosts"] = not any(wf.path == "/etc/hosts" for wf in h.write_files)
    user: dict[str, Any] = {"name": lab.user.name, "lock_passwd": True, "shell": "/bin/bash"}
    if lab.user.sudo:
        user["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
    cfg["user"] = user
    cfg["ssh_authorized_keys"] = _ssh_keys(lab, ws, h)
    cfg["ssh_pwauth"] = False
    files = _write_files(lab, ws, h)
    if files:
        cfg["write_files"] = files
    if h.packages:
        cfg["packages"] = list(h.packages)
    cfg["runcmd"] = list(h.runcmd)
    return cfg



def _schema_check(lab: Lab, ws: Workspace, h: Host, data: bytes, name: str) -> None:
    """cloud-init's own schema (of the lab image's release) on a #cloud-config."""
    from builders.artifacts.baseimage import release
    from builders.tools import cloudinit_schema
    rel = release(lab)
    attr = name.replace("-", "_")
    value = getattr(h, attr, None)
    at = where(lab, f"hosts.{h.name}.{attr}") + (f": {value}" if value else
                                                 " (generated user-data)")
    mirror = lab.build.debian_mirror if rel.distro == "debian" else lab.build.ubuntu_mirror
    cloudinit_schema.check_cloud_config(data, at, ws.cache, rel.distro, rel.codename, mirror)


def render(lab: Lab, ws: Workspace, host: Host | str) -> Seed:
    """Render and validate one host's seed files; raise LabError on bad input."""
    h = host_of(lab, host)
    kafka_warning = []
    if h.user_data is None and h in lab.brokers() and kafka_node.missing_certs(lab, ws, h):
        kafka_warning.append(f"{h.name}: no Kafka stores in certs/kafka/ yet (run `invoke "
                             "certs` first): the seed configures neither ZooKeeper nor Kafka")
    h = kafka_node.with_node_config(lab, h, ws)
    warnings: list[str] = kafka_warning
    supplied: dict[str, bytes] = {}
    for name, attr in (("user-data", "user_data"), ("network-config", "network_config"),
                       ("vendor-data", "vendor_data")):
        value = getattr(h, attr)
        if value is None:
            continue
        at = f"hosts.{h.name}.{attr}"
        path = lab.path(value)
        data = read_source(lab, path, at, "fix the path")
        shown = value if not Path(value).is_absolute() else str(path)
        if name == "network-config":
            validate_network_config(data, f"{where(lab, at)}: {shown}")
        else:
            warnings += validate_user_data(data, f"{where(lab, at)}: {shown}")
        supplied[name] = data

    cfg = None
    if "user-data" not in supplied:
        cfg = _user_data(lab, ws, h)
        check_generated(cfg, where(lab, f"hosts.{h.name}"))
    elif h.write_files or h.packages or h.runcmd or h.ssh_authorized_keys:
        raise LabError(f"{where(lab, f'hosts.{h.name}.user_data')}: a user-supplied user-data "
                       "is used as is; move write_files/packages/runcmd/ssh_authorized_keys "
                       "into that file or drop user_data")
    netcfg = supplied.get("network-config") or dump_yaml(network_config(lab, h)).encode()

    # the instance-id covers everything the guest gets, except the marker
    # (which contains the instance-id)
    digest = input_digest(GENERATOR, h.name, lab.fqdn(h), cfg, netcfg,
                          supplied.get("user-data"), supplied.get("vendor-data"))
    instance_id = f"iid-{h.name}-{digest[:12]}"
    marker = f"labforge-seed-ok {h.name} {instance_id}"

    if cfg is not None:
        cfg["runcmd"].append(_marker_cmd(marker))
        user_data = ("#cloud-config\n" + dump_yaml(cfg)).encode()
    else:
        user_data = supplied["user-data"]
    _schema_check(lab, ws, h, user_data, "user-data")
    if "vendor-data" in supplied:
        _schema_check(lab, ws, h, supplied["vendor-data"], "vendor-data")
    meta = dump_yaml({"instance-id": instance_id, "local-hostname": h.name}).encode()
    files = {"meta-data": meta, "network-config": netcfg, "user-data": user_data}
    if "vendor-data" in supplied:
        files["vendor-data"] = supplied["vendor-data"]
    files = {k: files[k] for k in ORDER if k in files}
    seed = Seed(host=h.name, files=files, instance_id=instance_id, marker=marker,
                secret=is_secret(lab, ws, h), generated_user_data=cfg is not None,
                warnings=warnings)
    check_size(lab, h.name, seed.size)
    return seed
