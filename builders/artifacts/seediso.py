"""cloud-init NoCloud seeds: one ISO 9660 volume labelled ``cidata`` per host.

The seed holds ``meta-data``, ``user-data``, ``network-config`` (and
``vendor-data`` when lab.yaml names one) at its root, with Rock Ridge and
Joliet names, as ``genisoimage -volid cidata -joliet -rock`` makes it.  It
is written with pycdlib in this process: no external binaries.

Content comes from lab.yaml (see docs/seed-iso.md):

- meta-data: ``instance-id`` (host name + a digest of the seed's content, so
  a changed seed is a new instance to cloud-init) and ``local-hostname``;
- network-config v2: DHCP kept on the first NIC (by its kernel name), the
  lab NIC static, matched by MAC (and renamed) when lab.yaml gives
  ``hosts.X.mac``, else by interface name;
- user-data ``#cloud-config``: hostname, fqdn, /etc/hosts, the default user
  with SSH keys, write_files (base64), packages, runcmd, and last a runcmd
  entry printing :func:`seed_marker` to the serial console.

A host may name its own user-data / network-config / vendor-data files; they
are validated (YAML with line numbers, header, known keys) and used as is.

Seeds are reproducible: ISO timestamps come from ``SOURCE_DATE_EPOCH`` (or a
fixed date), files are in a fixed order, so the same inputs give the same
bytes.  A seed that carries material from certs/ (a ``write_files[].source``
of ``"certs:..."`` or any path that resolves under certs/, or a user-data /
vendor-data / network-config file there) is secret: it is written to
``certs/seed/<host>.iso`` (0600) and kept out of the manifest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import yaml

from builders.artifacts import kafka_node
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write, fsync_dir, sha256_file
from builders.core.lab import Host, Lab, parse_yaml
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

log = logging.getLogger("labforge")

KIND = "seed-iso"
KIND_VFAT = "seed-vfat"                  # --format vfat: artifacts/seed/<host>.img
GENERATOR = "labforge-seed/1"            # bump when generated content changes shape
VOLUME_ID = "cidata"                     # what cloud-init's NoCloud looks for
MAX_SEED_BYTES = 16 * 1024 * 1024        # see docs/seed-iso.md ("Size limit")
DEFAULT_EPOCH = 1577836800               # 2020-01-01T00:00:00Z when SOURCE_DATE_EPOCH is unset
CERTS_PREFIX = "certs:"
LAB_KEY = ("ssh", "lab_ed25519.pub")     # made by `invoke certs`
FORMATS = ("iso", "vfat")
# ISO 9660 (level 2) identifiers of the seed files; Rock Ridge / Joliet carry the real names
_ISO_NAMES = {
    "meta-data": "META_DATA.;1",
    "network-config": "NETWORK_CONFIG.;1",
    "user-data": "USER_DATA.;1",
    "vendor-data": "VENDOR_DATA.;1",
}
_ORDER = ("meta-data", "network-config", "user-data", "vendor-data")
_SSH_KEY = re.compile(r"^(?:(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)"
                      r"\s+[A-Za-z0-9+/]+={0,3}(?:\s.*)?)$")

# Top-level keys cloud-init's modules and base config understand (from the
# cloud-init module reference and its config schema; names only).  A key not
# here is reported as a warning: cloud-init ignores unknown keys silently.
CLOUD_CONFIG_KEYS = frozenset("""
    allow_public_ssh_keys allow_userdata ansible apk_repos apt apt_pipelining apt_preserve_sources_list
    apt_reboot_if_required apt_update apt_upgrade authkey_hash autoinstall bootcmd
    byobu_by_default ca-certs ca_certs chef chpasswd cloud_config_modules
    cloud_final_modules cloud_init_modules create_hostname_file datasource
    datasource_list device_aliases disable_ec2_metadata disable_root disable_root_opts
    disk_setup drivers fan final_message fqdn fs_setup groups growpart grub-dpkg
    grub_dpkg hostname hotplug keyboard landscape launch-index locale locale_configfile
    lxd manage_etc_hosts manage_resolv_conf manual_cache_clean mcollective merge_how
    merge_type migrate mount_default_fields mounts network no_ssh_fingerprints ntp
    output package_reboot_if_required package_update package_upgrade packages password
    phone_home power_state prefer_fqdn_over_hostname preserve_hostname puppet
    random_seed reporting resize_rootfs resolv_conf rh_subscription rsyslog runcmd
    salt_minion snap spacewalk ssh ssh_authorized_keys ssh_deletekeys
    ssh_fp_console_blacklist ssh_genkeytypes ssh_import_id ssh_key_console_blacklist
    ssh_keys ssh_publish_hostkeys ssh_pwauth ssh_quiet_keygen swap system_info
    timezone ubuntu_advantage ubuntu_pro updates user users vendor_data wireguard
    write_files yum_repo_dir yum_repos zypper
""".split())

# Types cloud-init expects for the keys labforge generates (checked before writing).
_GENERATED_TYPES: dict[str, type | tuple[type, ...]] = {
    "hostname": str, "fqdn": str, "manage_etc_hosts": bool, "user": dict,
    "ssh_authorized_keys": list, "ssh_pwauth": bool, "write_files": list,
    "packages": list, "runcmd": list,
}


# --------------------------------------------------------------------------
# what a seed is
# --------------------------------------------------------------------------
@dataclass
class Seed:
    """The rendered content of one host's seed (not yet an ISO)."""
    host: str
    files: dict[str, bytes]                 # seed file name -> bytes, in _ORDER
    instance_id: str
    marker: str
    secret: bool                            # carries material from certs/
    generated_user_data: bool               # False: the host's own user-data file
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def _human(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def _host(lab: Lab, host: Host | str) -> Host:
    return host if isinstance(host, Host) else lab.host(host)


def _under(path: Path, root: Path) -> bool:
    """``path`` (symlinks followed) is ``root`` or inside it."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):       # a symlink loop: reading it fails later, clearly
        return False


def is_secret(lab: Lab, ws: Workspace, host: Host) -> bool:
    """A seed is secret when anything on it comes from the workspace's certs/:
    a ``certs:`` write_files source, or any write_files source or user-data /
    vendor-data / network-config file whose path (relative to the lab file,
    symlinks followed) lies under certs/."""
    for wf in (*host.write_files, *kafka_node.node_config(lab, host, ws)[0]):
        if wf.source is None:
            continue
        if wf.source.startswith(CERTS_PREFIX) or _under(lab.path(wf.source), ws.certs):
            return True
    return any(value is not None and _under(lab.path(value), ws.certs)
               for value in (host.user_data, host.vendor_data, host.network_config))


def seed_path(lab: Lab, ws: Workspace, host: Host | str, *, fmt: str = "iso") -> Path:
    """Where the host's seed is written: artifacts/seed/<host>.iso, or
    certs/seed/<host>.iso for a seed that carries secrets (``.img`` for vfat)."""
    h = _host(lab, host)
    suffix = ".iso" if fmt == "iso" else ".img"
    base = ws.certs if is_secret(lab, ws, h) else ws.artifacts
    return base / "seed" / f"{h.name}{suffix}"


def seed_marker(lab: Lab, host: Host | str, ws: Workspace | None = None) -> str:
    """The line the seed's runcmd prints to the serial console when cloud-init
    applied it: ``labforge-seed-ok <host> <instance-id>``.

    The instance-id depends on the seed's content, which includes files from
    the workspace (the lab SSH key, certs); pass the workspace the seed was
    built in (default: ``Workspace.default(lab)``, as the CLI uses).
    """
    return render(lab, ws or Workspace.default(lab), host).marker


def source_date_epoch() -> int:
    """ISO timestamps: SOURCE_DATE_EPOCH when set (reproducible-builds.org), else a fixed date."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return DEFAULT_EPOCH
    if not raw.isdigit() or not 0 < int(raw) < 253402300800:
        raise LabError(f"SOURCE_DATE_EPOCH: {raw!r} is not a number of seconds since 1970; "
                       "unset it or give e.g. $(git log -1 --format=%ct)")
    return int(raw)


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------
def _where(lab: Lab, field_path: str) -> str:
    return f"{lab.source.name}: {field_path}"


def _read(lab: Lab, path: Path, where: str, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LabError(f"{_where(lab, where)}: {path}: no such file; {hint}") from None
    except IsADirectoryError:
        raise LabError(f"{_where(lab, where)}: {path}: is a directory; name a file") from None
    except OSError as exc:
        raise LabError(f"{_where(lab, where)}: {path}: cannot read: {exc.strerror}") from None


def _certs_file(ws: Workspace, ref: str, where: str, lab: Lab) -> Path:
    rel = ref[len(CERTS_PREFIX):]
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or ".." in parts:
        raise LabError(f"{_where(lab, where)}: {ref!r} must name a file under certs/, "
                       "like certs:kafka/broker1.keystore.jks")
    return ws.certs.joinpath(*parts)


def _ssh_keys(lab: Lab, ws: Workspace, h: Host) -> list[str]:
    """The host's authorized keys, in lab.yaml order: key files (relative to
    the lab file) or keys given inline; default: the lab key from `invoke certs`."""
    sources: list[tuple[str, Path | None, str]] = []    # (where, file, inline key)
    if not h.ssh_authorized_keys:
        path = ws.certs.joinpath(*LAB_KEY)
        if not path.is_file():
            raise LabError(f"{_where(lab, f'hosts.{h.name}')}: no SSH key ({path} not found): "
                           f"run `invoke certs` first or set hosts.{h.name}.ssh_authorized_keys")
        sources.append((str(path), path, ""))
    for i, entry in enumerate(h.ssh_authorized_keys):
        where = f"hosts.{h.name}.ssh_authorized_keys[{i}]"
        if _SSH_KEY.match(entry.strip()):
            sources.append((where, None, entry.strip()))
        else:
            path = lab.path(entry)
            _read(lab, path, where, "fix the path or create the key (ssh-keygen -t ed25519)")
            sources.append((where, path, ""))
    keys: list[str] = []
    for where, path, inline in sources:
        if path is None:
            keys.append(inline)
            continue
        text = path.read_text(errors="replace")
        if "PRIVATE KEY" in text:
            raise LabError(f"{_where(lab, where)}: {path} is a private key; name the .pub file")
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        bad = [ln for ln in found if not _SSH_KEY.match(ln)]
        if not found or bad:
            raise LabError(f"{_where(lab, where)}: {path} is not an OpenSSH public key "
                           "(expected lines like 'ssh-ed25519 AAAA... comment')")
        keys.extend(found)
    return keys


def _write_files(lab: Lab, ws: Workspace, h: Host) -> list[dict]:
    out = []
    for i, wf in enumerate(h.write_files):
        where = f"hosts.{h.name}.write_files[{i}].source"
        if wf.source is not None:
            if wf.source.startswith(CERTS_PREFIX):
                path = _certs_file(ws, wf.source, where, lab)
                data = _read(lab, path, where, "run `invoke certs` first or fix the name")
            else:
                data = _read(lab, lab.path(wf.source), where, "fix the path")
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


# libyaml's emitter when PyYAML has it (10x faster); tests check that both
# emitters give the same text for what labforge generates
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _dump(data: Any, dumper: type = _DUMPER) -> str:
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False,
                     width=1 << 20, allow_unicode=True)


def _nic_name(lab: Lab, i: int, nic) -> str:
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
                               "set-name": _nic_name(lab, i, nic)}
        if net.dhcp:
            cfg["dhcp4"] = True
        else:
            cfg["dhcp4"] = False
            cfg["addresses"] = [f"{nic.ip}/{net.cidr.prefixlen}"]
            if net.forward == "nat" and net.gateway is not None:
                cfg["routes"] = [{"to": "0.0.0.0/0", "via": str(net.gateway), "metric": 200}]
                cfg["nameservers"] = {"addresses": [str(net.gateway)],
                                      **({"search": [lab.domain]} if lab.domain else {})}
        ethernets[_nic_name(lab, i, nic)] = cfg
    return {"version": 2, "ethernets": ethernets}


def _network_config(lab: Lab, h: Host) -> dict:
    if len(h.nics) > 1:
        return _nics_config(lab, h)
    net = lab.network(h.network) if h.network else lab.networks[0]
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


def render(lab: Lab, ws: Workspace, host: Host | str) -> Seed:
    """Render and validate one host's seed files; raise LabError on bad input."""
    h = _host(lab, host)
    warnings: list[str] = []
    if h.user_data is None and h in lab.brokers() and kafka_node.missing_certs(lab, ws, h):
        warnings.append(f"{h.name}: no Kafka stores in certs/kafka/ yet (run `invoke certs` "
                        "first): the seed configures neither ZooKeeper nor Kafka")
    h = kafka_node.with_node_config(lab, h, ws)
    supplied: dict[str, bytes] = {}
    for name, attr in (("user-data", "user_data"), ("network-config", "network_config"),
                       ("vendor-data", "vendor_data")):
        value = getattr(h, attr)
        if value is None:
            continue
        where = f"hosts.{h.name}.{attr}"
        path = lab.path(value)
        data = _read(lab, path, where, "fix the path")
        shown = value if not Path(value).is_absolute() else str(path)
        if name == "network-config":
            validate_network_config(data, f"{_where(lab, where)}: {shown}")
        else:
            warnings += validate_user_data(data, f"{_where(lab, where)}: {shown}")
        supplied[name] = data

    cfg = None
    if "user-data" not in supplied:
        cfg = _user_data(lab, ws, h)
        _check_generated(cfg, f"{_where(lab, f'hosts.{h.name}')}")
    elif h.write_files or h.packages or h.runcmd or h.ssh_authorized_keys:
        raise LabError(f"{_where(lab, f'hosts.{h.name}.user_data')}: a user-supplied user-data "
                       "is used as is; move write_files/packages/runcmd/ssh_authorized_keys "
                       "into that file or drop user_data")
    netcfg = supplied.get("network-config") or _dump(_network_config(lab, h)).encode()

    # the instance-id covers everything the guest gets, except the marker
    # (which contains the instance-id)
    digest = input_digest(GENERATOR, h.name, lab.fqdn(h), cfg, netcfg,
                          supplied.get("user-data"), supplied.get("vendor-data"))
    instance_id = f"iid-{h.name}-{digest[:12]}"
    marker = f"labforge-seed-ok {h.name} {instance_id}"

    if cfg is not None:
        cfg["runcmd"].append(_marker_cmd(marker))
        user_data = ("#cloud-config\n" + _dump(cfg)).encode()
    else:
        user_data = supplied["user-data"]
    meta = _dump({"instance-id": instance_id, "local-hostname": h.name}).encode()
    files = {"meta-data": meta, "network-config": netcfg, "user-data": user_data}
    if "vendor-data" in supplied:
        files["vendor-data"] = supplied["vendor-data"]
    files = {k: files[k] for k in _ORDER if k in files}
    seed = Seed(host=h.name, files=files, instance_id=instance_id, marker=marker,
                secret=is_secret(lab, ws, h), generated_user_data=cfg is not None, warnings=warnings)
    if seed.size > MAX_SEED_BYTES:
        raise LabError(f"{_where(lab, f'hosts.{h.name}')}: the seed would hold "
                       f"{_human(seed.size)}, over the {_human(MAX_SEED_BYTES)} limit; ship large "
                       "files another way (a package, a shared disk) and keep write_files small")
    return seed


# --------------------------------------------------------------------------
# validation of cloud-init inputs
# --------------------------------------------------------------------------
_SCRIPT_HEADERS = ("#!", "#include", "#include-once", "#cloud-boothook", "#part-handler",
                   "#cloud-config-jsonp")


def validate_user_data(data: bytes, name: str) -> list[str]:
    """Check user-data (or vendor-data) the way cloud-init reads it; return warnings.

    ``#cloud-config``: YAML that parses (errors name the line), a mapping,
    unknown top-level keys warned.  A script / include / boothook is taken
    as is.  A MIME multipart message: each text/cloud-config part is checked.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabError(f"{name}: not UTF-8 text (byte {exc.start}); cloud-init reads user-data "
                       "as text") from None
    first = text.split("\n", 1)[0].strip()
    if first.startswith("## template:"):                 # jinja: the next line is the header
        rest = text.split("\n", 1)[1] if "\n" in text else ""
        first = rest.split("\n", 1)[0].strip()
        if first.startswith(("#!", "#cloud-config-")):   # a script, an archive: as before
            return []
        if not first.startswith("#cloud-config"):
            raise LabError(f"{name}:2: a '## template: jinja' user-data needs #cloud-config "
                           "(or #! for a script) on its second line")
        return _check_jinja_cloud_config(text, name)
    if first.startswith("#cloud-config-archive"):
        doc = parse_yaml(text, name)
        if not isinstance(doc, list):
            raise LabError(f"{name}:1: #cloud-config-archive must be a YAML list of parts")
        return []
    if first.startswith("#cloud-config"):
        return check_cloud_config(text, name)
    if any(first.startswith(p) for p in _SCRIPT_HEADERS):
        return []
    if re.match(r"^(content-type|mime-version)\s*:", first, re.I):
        return _check_mime(data, name)
    return _bad_header(name)


_JINJA = re.compile(r"\{\{|\{%|\{#")


def _check_jinja_cloud_config(text: str, name: str) -> list[str]:
    """A cloud-config behind a '## template: jinja' line: the header line is a
    YAML comment, so the whole text is checked (line numbers stay the file's).
    Jinja syntax ({{ }}, {% %}) is often not YAML until cloud-init renders it:
    then only the header is checked, with a warning."""
    try:
        return check_cloud_config(text, name)
    except LabError as exc:
        if not _JINJA.search(text):
            raise
        msg = (f"{name}: a jinja template that is not YAML before rendering ({exc}); "
               "checked the #cloud-config header only")
        log.warning("warning: %s", msg)
        return [msg]


def _bad_header(name: str) -> list[str]:
    raise LabError(f"{name}:1: user-data must start with #cloud-config (or #! for a script, "
                   "or be a MIME multipart message)")


def _check_mime(data: bytes, name: str) -> list[str]:
    import email            # only for MIME user-data: keeps the common path's start-up short
    import email.policy
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.defects:
        raise LabError(f"{name}: not a valid MIME message ({msg.defects[0].__class__.__name__})")
    warnings: list[str] = []
    parts = list(msg.walk()) if msg.is_multipart() else [msg]
    for i, part in enumerate(parts):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/cloud-config":
            payload = part.get_payload(decode=True) or b""
            warnings += check_cloud_config(payload.decode("utf-8", "replace"),
                                           f"{name} (MIME part {i})")
    return warnings


def check_cloud_config(text: str, name: str) -> list[str]:
    """YAML parse (with line numbers), a mapping, and warnings for unknown keys."""
    doc = parse_yaml(text, name)
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise LabError(f"{name}:1: #cloud-config must be a YAML mapping of keys, not "
                       f"{type(doc).__name__}")
    warnings = []
    for key in doc:
        if str(key) not in CLOUD_CONFIG_KEYS:
            msg = f"{name}: unknown cloud-config key {key!r}; cloud-init will ignore it"
            log.warning("warning: %s", msg)
            warnings.append(msg)
    return warnings


def validate_network_config(data: bytes, name: str) -> None:
    """network-config: YAML (line numbers), version 1 or 2, optionally under ``network:``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    doc = parse_yaml(text, name)
    if isinstance(doc, dict) and isinstance(doc.get("network"), dict):
        doc = doc["network"]
    version = doc.get("version") if isinstance(doc, dict) else None
    # type(...) is int: `version: true` is a bool, which Python would take for 1
    if type(version) is not int or version not in (1, 2):
        raise LabError(f"{name}:1: network-config must be a mapping with 'version: 1' or "
                       "'version: 2' (optionally under 'network:')")
    if version == 2:
        for section in ("ethernets", "bonds", "bridges", "vlans"):
            if section in doc and not isinstance(doc[section], dict):
                raise LabError(f"{name}: network-config {section}: expected a mapping of "
                               "interface id: settings")
    elif not isinstance(doc.get("config"), list):
        raise LabError(f"{name}: network-config version 1 needs a 'config:' list")


def _check_generated(cfg: dict, where: str) -> None:
    """The keys labforge generates have the types cloud-init's schema expects."""
    for key, value in cfg.items():
        want = _GENERATED_TYPES.get(key)
        if want is not None and not isinstance(value, want):
            raise LabError(f"{where}: generated {key} is {type(value).__name__}, "
                           "not what cloud-init expects (a labforge bug; please report it)")
    for item in cfg.get("packages", []):
        if not isinstance(item, str) or not item or any(c.isspace() for c in item):
            raise LabError(f"{where}.packages: {item!r} is not a package name")
    for i, item in enumerate(cfg.get("runcmd", [])):
        if not isinstance(item, (str, list)) or item == "":
            raise LabError(f"{where}.runcmd[{i}]: {item!r} is not a command")


# --------------------------------------------------------------------------
# the ISO
# --------------------------------------------------------------------------
class _FrozenClock:
    """Stands in for the ``time`` module inside pycdlib while a seed is built:
    ``time()`` is the fixed epoch and local time is UTC.  pycdlib reads the
    clock for the volume descriptor dates (creation, modification, effective,
    and the modification date again when it writes), every directory record
    date and every Rock Ridge TF entry; Joliet's descriptor and records use the
    same calls.  There is no API to pass a date in, hence this."""

    def __init__(self, epoch: int):
        self._epoch = float(epoch)

    def time(self) -> float:
        return self._epoch

    def localtime(self, secs: float | None = None) -> time.struct_time:
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_clock_lock = threading.Lock()


@contextlib.contextmanager
def _frozen_clock(epoch: int) -> Iterator[None]:
    import pycdlib  # noqa: F401  (load its submodules)
    mods = [m for n, m in list(sys.modules.items())
            if n.startswith("pycdlib.") and getattr(m, "time", None) is time]
    with _clock_lock:
        clock = _FrozenClock(epoch)
        for m in mods:
            m.time = clock
        try:
            yield
        finally:
            for m in mods:
                m.time = time


def make_iso(files: dict[str, bytes], epoch: int) -> bytes:
    """The ISO 9660 image (Rock Ridge 1.09 + Joliet, volume id cidata) of ``files``."""
    import pycdlib
    with _frozen_clock(epoch):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=2, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID,
                sys_ident="LINUX", app_ident_str="LABFORGE SEED-ISO (PYCDLIB)")
        for name in _ORDER:
            if name not in files:
                continue
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), "/" + _ISO_NAMES[name],
                       rr_name=name, joliet_path="/" + name, file_mode=0o100444)
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def make_vfat(files: dict[str, bytes], epoch: int) -> bytes:
    """The FAT12 image (label cidata) of ``files``; see builders/seedvfat.py."""
    from builders.artifacts.seedvfat import make_vfat as _make
    return _make(files, epoch, label=VOLUME_ID)


def _pycdlib_version() -> str:
    from importlib.metadata import version
    return version("pycdlib")


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------
def _state_path(ws: Workspace) -> Path:
    return ws.certs / "seed" / "state.json"


def _load_state(ws: Workspace) -> dict:
    try:
        data = json.loads(_state_path(ws).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _save_state(ws: Workspace, state: dict) -> None:
    ws.certs_dir("seed")
    atomic_write(_state_path(ws), json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)


def build_seed_isos(lab: Lab, ws: Workspace, *, hosts: Iterable[str] | None = None,
                    force: bool = False, fmt: str = "iso") -> list[Outcome]:
    """Build the seed of each host (default: all hosts, in lab order).

    Every seed is rendered and validated first: a bad input anywhere stops
    the run before any file is written.  Public seeds go to
    artifacts/seed/<host>.iso and the manifest; secret ones (carrying
    certs/ material) to certs/seed/<host>.iso, 0600, recorded only in
    certs/seed/state.json.
    """
    if fmt not in FORMATS:
        raise LabError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
    chosen = [lab.host(n) for n in names]
    if not chosen:
        raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to seed")
    epoch = source_date_epoch()
    tool = _pycdlib_version()
    seeds = [render(lab, ws, h) for h in chosen]
    kind = KIND if fmt == "iso" else KIND_VFAT
    outcomes: list[Outcome] = []
    with BuildLock(ws):
        manifest = Manifest(ws.artifacts)
        entries = manifest.entries()
        state = _load_state(ws)
        state_changed = False
        pending: list[tuple[Path, bytes, int]] = []
        records: list[dict] = []
        for h, seed in zip(chosen, seeds):
            start = time.monotonic()
            path = seed_path(lab, ws, h, fmt=fmt)
            digest = input_digest(KIND, fmt, seed.files, epoch, tool)
            step = f"seed-iso {h.name}" if fmt == "iso" else f"seed-vfat {h.name}"
            state_changed |= _drop_other_location(ws, path, manifest, entries, state)
            if seed.secret:
                current = _secret_current(state, path, digest)
            else:
                current = _public_current(manifest, entries, path, digest)
            shown = _shown(ws, path)
            if current and not force:
                outcomes.append(Outcome(step, "up to date", [path], shown))
                continue
            image = make_iso(seed.files, epoch) if fmt == "iso" else make_vfat(seed.files, epoch)
            sha = hashlib.sha256(image).hexdigest()
            if seed.secret:
                ws.certs_dir("seed")
                pending.append((path, image, 0o600))
                state[path.name] = {"input_digest": digest, "sha256": sha, "size": len(image),
                                    "instance_id": seed.instance_id, "host": h.name,
                                    "marker": seed.marker, "format": fmt}
                state_changed = True
                detail = f"{shown}, secret: holds certs/ material, not in the manifest"
            else:
                pending.append((path, image, 0o644))
                records.append(dict(path=path, kind=kind, digest=digest, sha256=sha,
                                    tools={"pycdlib": tool} if fmt == "iso" else {},
                                    meta={"host": h.name, "instance_id": seed.instance_id,
                                          "marker": seed.marker, "format": fmt,
                                          "files": list(seed.files)}))
                detail = shown
            outcomes.append(Outcome(step, "built", [path], detail,
                                    seconds=time.monotonic() - start))
        try:
            _write_all(pending)
        except OSError as exc:
            where = exc.filename or (pending[0][0].parent if pending else ws.artifacts)
            raise LabError(f"{where}: cannot write the seeds: {exc.strerror or exc}; free some "
                           "space or fix the directory's permissions and rerun") from None
        if records:
            manifest.record_many(records)
        if state_changed:
            _save_state(ws, state)
    return outcomes


def _public_current(manifest: Manifest, entries: dict, path: Path, digest: str) -> bool:
    rec = entries.get(manifest.rel(path))
    if rec is None or rec.get("input_digest") != digest:
        return False
    return manifest.intact(path, rec)


def _secret_current(state: dict, path: Path, digest: str) -> bool:
    rec = state.get(path.name)
    if not rec or rec.get("input_digest") != digest or not path.is_file():
        return False
    return path.stat().st_size == rec.get("size") and sha256_file(path) == rec.get("sha256")


def _write_all(outputs: list[tuple[Path, bytes, int]]) -> None:
    """Write every image atomically: temporary file, fsync, rename, then one
    directory fsync per directory.  The fsyncs run in parallel threads, so
    the file system commits them together instead of one journal commit
    per seed.  On a failure the temporary files left are removed; a seed
    renamed into place before it is not yet in the manifest or state file,
    so the next run rebuilds it."""
    from concurrent.futures import ThreadPoolExecutor

    tmps: list[tuple[Path, Path, int]] = []
    try:
        for target, data, mode in outputs:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                       dir=target.parent)
            tmps.append((Path(tmp), target, fd))
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        if len(tmps) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(tmps))) as pool:
                list(pool.map(os.fsync, [fd for _, _, fd in tmps]))
        else:
            for _, _, fd in tmps:
                os.fsync(fd)
        for i, (tmp, target, fd) in enumerate(tmps):
            os.close(fd)
            tmps[i] = (tmp, target, -1)
        for tmp, target, _ in tmps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _, fd in tmps:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    for d in sorted({target.parent for _, target, _ in tmps}):
        fsync_dir(d)


def _shown(ws: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _drop_other_location(ws: Workspace, path: Path, manifest: Manifest, entries: dict,
                         state: dict) -> bool:
    """A seed that moved between artifacts/ and certs/ (a certs: source was
    added or removed) must not leave its old copy behind: a stale public
    seed would be published, a stale secret one would linger.  Returns True
    when ``state`` changed."""
    public = ws.artifacts / "seed" / path.name
    secret = ws.certs / "seed" / path.name
    if path == secret and public.exists():
        public.unlink()
        if manifest.rel(public) in entries:
            manifest.remove(public)
    elif path == public and secret.exists():
        secret.unlink()
        return state.pop(path.name, None) is not None
    return False


def read_seed(path: Path) -> dict[str, bytes]:
    """The files on a seed ISO by their Rock Ridge names (for checks and tests)."""
    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()
