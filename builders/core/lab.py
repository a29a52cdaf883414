"""The lab description: lab.yaml loaded into frozen, typed objects.

Loading validates everything at once and reports every problem as
``lab.yaml: hosts.broker2.ip: 10.200.0.12 is not in network private
(10.100.0.0/24)``; nothing is built from a lab that has any problem.

The schema is the dataclasses below: field names are the YAML keys, type
hints are the types checked, defaults are the defaults.  Unknown keys are
errors (a typo must not be silently ignored).  Semantic checks that span
fields live in :func:`_check`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml

from builders.core import resources
from builders.core.errors import LabError
from builders.core.fsutil import read_regular

DEFAULT_LAB = resources.default_lab()

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)((?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_CN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# the roles labforge acts on (a host's roles say what it is built for); a
# misspelled role would silently leave a broker without its certificate
ROLES = ("kafka-broker",)
# what labforge reads from files the lab names, at most (a bigger file is
# surely the wrong one; a device or pipe is never read)
LAB_FILE_LIMIT = 1 << 20
SEED_FILE_LIMIT = 1 << 20          # user-data, vendor-data, network-config
SOURCE_FILE_LIMIT = 16 << 20       # a write_files source (embedded in user-data)
KEY_FILE_LIMIT = 64 << 10          # SSH keys
PASSWORD_FILE_LIMIT = 4 << 10
BUNDLE_FILE_LIMIT = 16 << 20       # a CA bundle
# the files `invoke certs` writes in certs/octavia/ besides the amphora SSH key
# pair (builders.artifacts.certs.octavia.F; a test keeps the two the same): the key pair
# named octavia.amp_ssh_key_name must not overwrite one of them
OCTAVIA_FILES = frozenset({
    "server_ca.cert.pem", "server_ca.key.pem", "server_ca-chain.cert.pem",
    "client_ca.cert.pem", "client_ca.key.pem", "client.cert-and-key.pem",
    "ca_private_key_passphrase", "server_certs_key_passphrase", "heartbeat_key",
    "octavia-certificates.conf",
})


# --------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A lab network (libvirt network for Vagrant/virsh; static addresses)."""
    name: str = ""
    cidr: IPv4Network = IPv4Network("10.100.0.0/24")
    gateway: IPv4Address | None = None     # host side address of the bridge
    dhcp: bool = False                     # private lab networks use static IPs
    bridge: str | None = None              # default: lf-<name>
    forward: Literal["none", "nat"] = "none"


@dataclass(frozen=True)
class WriteFile:
    """A file cloud-init writes into the guest (write_files)."""
    path: str = ""                         # destination inside the guest
    source: str | None = None              # local file; "certs:kafka/x" = under certs/
    content: str | None = None             # inline text instead of source
    owner: str = "root:root"
    permissions: str = "0644"


@dataclass(frozen=True)
class Host:
    name: str = ""
    ip: IPv4Address = IPv4Address("0.0.0.0")
    network: str = ""                      # default: the lab's first network
    mac: str | None = None                 # lab NIC MAC; network-config matches on it
    cpus: int = 2
    memory: int = 2048                     # MiB
    disk: int = 20                         # GiB
    roles: tuple[str, ...] = ()            # kafka-broker, ...
    image: str = "debian-12"               # base image the overlay is backed by
    extra_sans: tuple[str, ...] = ()       # more DNS names / IPs for the certificate
    ssh_authorized_keys: tuple[str, ...] = ()  # public key files; default: certs/ssh/lab key
    packages: tuple[str, ...] = ()
    runcmd: tuple[str, ...] = ()
    write_files: tuple[WriteFile, ...] = ()
    user_data: str | None = None           # a user-supplied user-data file, used as is
    network_config: str | None = None      # a user-supplied network-config file, used as is
    # seed-iso: the optional vendor-data file, and the NIC names in network-config
    vendor_data: str | None = None         # a vendor-data file put on the seed as is
    interface: str | None = None           # lab NIC: with mac, renamed to this (default lab0);
                                           # without mac, the kernel's name to match (default eth1)
    dhcp_interface: str = "eth0"           # NIC kept on DHCP: its kernel name (eth0 with
                                           # net.ifnames=0); "" for none


@dataclass(frozen=True)
class User:
    name: str = "debian"                   # the image's default user
    sudo: bool = True


@dataclass(frozen=True)
class Pki:
    key_type: Literal["rsa", "ecdsa"] = "rsa"
    rsa_bits: int = 2048
    ca_days: int = 3650
    leaf_days: int = 825


@dataclass(frozen=True)
class Kafka:
    brokers: tuple[str, ...] = ()          # default: hosts with role kafka-broker
    client: str = "kafka-client"           # client identity (certificate CN)
    port: int = 9093                       # TLS listener
    password_file: str | None = None       # store/key password; default: generated
    ssl_dir: str = "/etc/kafka/ssl"        # where the stores live on the hosts (.properties)
    store_type: Literal["PKCS12", "JKS"] = "PKCS12"  # store type the .properties use


@dataclass(frozen=True)
class Amphora:
    base_os: Literal["debian", "ubuntu"] = "debian"
    release: str = "bookworm"
    arch: Literal["amd64", "arm64"] = "amd64"
    size: int = 2                          # GB
    agent: Literal["source", "package"] = "source"
    ssh: bool = True
    image_type: Literal["qcow2", "raw"] = "qcow2"
    octavia_version: str = "19.0.0"        # Octavia sdist on PyPI the elements come from
    octavia_git: str | None = None         # or a git URL ...
    octavia_ref: str | None = None         # ... and ref (branch, tag, sha)
    build: bool = True                     # `invoke all` builds the amphora


@dataclass(frozen=True)
class Octavia:
    enabled: bool = True
    amp_image_tag: str = "amphora"
    image_name: str = "amphora-x64-haproxy"
    health_managers: tuple[str, ...] = ("10.100.0.5:5555",)  # controller_ip_port_list
    amp_ssh_key_name: str = "octavia_ssh_key"
    certs_dir: str | None = None           # where the controller reads the cert files
                                           # (octavia-certificates.conf); default: certs/octavia
    cert_validity_days: int = 30           # amphora certificates ([certificates] cert_validity_time)
    # cloud IDs labforge cannot know, for the [controller_worker] part of
    # octavia-certificates.conf; unset: a marked placeholder there
    amp_boot_network_list: tuple[str, ...] = ()   # lb-mgmt-net network ID(s)
    amp_secgroup_list: tuple[str, ...] = ()       # lb-mgmt-sec-grp security group ID(s)
    amp_flavor_id: str | None = None              # the amphora's Nova flavor ID
    amphora: Amphora = Amphora()


@dataclass(frozen=True)
class BaseImage:
    source: Literal["build", "download"] = "build"
    distro: Literal["debian", "ubuntu"] = "debian"
    release: str = "12"                    # debian 12 / bookworm, ubuntu 24.04 / noble
    url: str | None = None                 # mirror directory holding the image and SUMS
    size: int = 4                          # GB, for the `build` source
    # where the `build` source runs diskimage-builder: auto = in the amphora
    # builder container when that image already exists locally (never builds
    # it, never starts dockerd), else on the host; host; container = always in
    # the builder container (built, and dockerd started, when missing)
    builder: Literal["auto", "host", "container"] = "auto"


@dataclass(frozen=True)
class BuildSettings:
    debian_mirror: str | None = None       # default: the host's apt sources
    debian_security_mirror: str | None = None
    ubuntu_mirror: str | None = None
    pip_index: str | None = None
    ca_bundle: str | None = "/etc/ssl/certs/ca-certificates.crt"  # for builds behind a proxy
    keep_ca_bundle: bool = False           # leave the CA bundle in built images
    # FROM of the builder container; default: the local labforge/debian-base
    # that `invoke builder-base` makes (no registry needed).  With a registry:
    # debian:bookworm or your mirror of it.
    builder_from: str | None = None


@dataclass(frozen=True)
class Vagrant:
    box: str = "labforge/debian-12"
    management_network: str = "vagrant-libvirt"
    ssh_private_key: str | None = None     # key `vagrant ssh` uses; default: the one key in certs/ssh/


@dataclass(frozen=True)
class Glance:
    cloud: str | None = None               # clouds.yaml entry; default OS_CLOUD / OS_*
    visibility: Literal["private", "shared", "community", "public"] = "private"
    # upload flow: auto = direct (as the openstack CLI), glance-direct import if Glance refuses it
    method: Literal["auto", "direct", "glance-direct"] = "auto"
    keep: int | None = None                # amphora rotation: keep N newest, delete older ones
    deactivate_old: bool = False           # amphora rotation: deactivate older ones instead
    timeout: int = 60                      # seconds: connect and each wait for an answer


@dataclass(frozen=True)
class Lab:
    name: str = "lab"
    domain: str | None = None
    networks: tuple[Network, ...] = ()
    hosts: tuple[Host, ...] = ()
    user: User = User()
    pki: Pki = Pki()
    kafka: Kafka = Kafka()
    octavia: Octavia = Octavia()
    base_image: BaseImage = BaseImage()
    build: BuildSettings = BuildSettings()
    vagrant: Vagrant = Vagrant()
    glance: Glance = Glance()
    # where the lab file lives: relative paths in it are relative to this
    source: Path = field(default=DEFAULT_LAB, compare=False)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # -- lookups -------------------------------------------------------------
    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise LabError(f"{self.source.name}: no host named {name!r} (hosts: {known})")

    def network(self, name: str) -> Network:
        for n in self.networks:
            if n.name == name:
                return n
        raise LabError(f"{self.source.name}: no network named {name!r}")

    def require_hosts(self, task: str) -> "Lab":
        """This lab, or a LabError when it has no hosts (``task`` needs some)."""
        if not self.hosts:
            raise LabError(f"{self.source.name}: hosts: the lab has no hosts; {task} needs at "
                           "least one (see the embedded lab.yaml)")
        return self

    def host_network(self, host: Host) -> Network:
        """The network a host is on: its ``network``, else the lab's first one."""
        if host.network:
            return self.network(host.network)
        if not self.networks:
            raise LabError(f"{self.source.name}: networks: the lab has no network for "
                           f"hosts.{host.name}")
        return self.networks[0]

    def brokers(self) -> tuple[Host, ...]:
        if self.kafka.brokers:
            return tuple(self.host(n) for n in self.kafka.brokers)
        return tuple(h for h in self.hosts if "kafka-broker" in h.roles)

    def fqdn(self, host: Host) -> str:
        return f"{host.name}.{self.domain}" if self.domain else host.name

    def path(self, value: str) -> Path:
        """A path from the lab file, relative to the lab file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.source.parent / p)

    def section(self, name: str) -> Any:
        """The raw YAML of one top-level section (for input digests)."""
        return self.raw.get(name)


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster


class _Loader(_BaseLoader):
    """SafeLoader that refuses duplicate keys (a duplicated host must not
    silently replace the first) and keeps line numbers for messages."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:   # `{[a]: 1}` or `? [a]`: a list or mapping as a key
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value (a name or a number), not "
                f"{_tname(key)}", key_node.start_mark) from None
        if key in seen:
            loader.duplicates.append((key_node.start_mark.line + 1, key, seen[key]))
        else:
            seen[key] = key_node.start_mark.line + 1
    return _BaseLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Int(int):
    """A YAML int that remembers how it was written (0644 is 420)."""
    yaml_text = ""


class _Float(float):
    """A YAML float that remembers how it was written (24.10 is 24.1)."""
    yaml_text = ""


class _Bool:
    """A YAML boolean that remembers how it was written (on, yes, no ...)."""
    def __init__(self, value: bool, text: str):
        self.value, self.yaml_text = value, text

    def __bool__(self) -> bool:
        return self.value


class _LabLoader(_Loader):
    """The lab file's loader: numbers and booleans keep their source text, so
    a value YAML converted silently (an unquoted mode 0644, a release 24.10,
    a yes meant as text) is refused with the fix instead of used changed."""


def _keep_text(cls, base_constructor):
    def construct(loader, node):
        value = base_constructor(loader, node)
        if cls is _Bool:
            return _Bool(value, node.value)
        out = cls(value)
        out.yaml_text = node.value
        return out
    return construct


_LabLoader.add_constructor("tag:yaml.org,2002:int",
                           _keep_text(_Int, yaml.constructor.SafeConstructor.construct_yaml_int))
_LabLoader.add_constructor("tag:yaml.org,2002:float",
                           _keep_text(_Float, yaml.constructor.SafeConstructor.construct_yaml_float))
_LabLoader.add_constructor("tag:yaml.org,2002:bool",
                           _keep_text(_Bool, yaml.constructor.SafeConstructor.construct_yaml_bool))


def _plain(value: Any) -> Any:
    """``value`` with the loader's remembering types turned back into plain ones."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, _Bool):
        return value.value
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    return value


def parse_yaml(text: str, name: str, _loader: type = _Loader) -> Any:
    """Parse YAML; a syntax error or duplicate key is a LabError naming the line."""
    loader = _loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LabError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if loader.duplicates:
        lines = [f"{name}:{line}: {key!r} is given twice (first on line {first}); "
                 "keep one" for line, key, first in loader.duplicates]
        if len(lines) == 1:
            raise LabError(lines[0])
        raise LabError(f"{name}: {len(lines)} duplicate keys", lines)
    return data


def decode_text(raw: bytes, name: str) -> str:
    """UTF-8 text of a YAML file; anything else is a LabError naming the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise LabError(f"{name}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                       f"{exc.start}); save the file as UTF-8") from None


def load(path: Path | str | None = None) -> Lab:
    """Load and validate a lab file; raise LabError listing every problem."""
    path = Path(path) if path else DEFAULT_LAB
    name = path.name
    try:
        raw = read_regular(path, "the lab file", LAB_FILE_LIMIT)
    except FileNotFoundError:
        raise LabError(f"{path}: lab file not found; pass --lab FILE or create lab.yaml") from None
    except OSError as exc:
        raise LabError(f"{path}: cannot read lab file: {exc.strerror}") from None
    text = decode_text(raw, name)
    if text.startswith("\ufeff"):
        text = text[1:]         # a BOM some editors write: harmless here
    data = parse_yaml(text, name, _LabLoader)
    if data is None or data == {}:
        raise LabError(f"{path}: the lab file is empty; describe the lab in it (the embedded "
                       "lab.yaml is an example) or leave out --lab to use that")
    return from_dict(data, source=path.resolve())


def from_dict(data: Any, source: Path = DEFAULT_LAB) -> Lab:
    name = source.name
    errors: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LabError(f"{name}: the top level must be a mapping of sections, not {_tname(data)}")
    work = dict(data)
    # hosts and networks are mappings keyed by name; defaults merge into hosts
    defaults = work.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        errors.append(f"defaults: expected a mapping, got {_tname(defaults)}")
        defaults = {}
    work["networks"] = _named(work.get("networks", {}), "networks", errors, {})
    work["hosts"] = _named(work.get("hosts", {}), "hosts", errors, defaults)
    lab = _convert(Lab, work, "", errors)
    if lab is not None:
        lab = dataclasses.replace(lab, source=source, raw=_plain(data))
        # cross-field checks run too, except on fields already reported
        # (a field that failed to convert holds its default)
        reported = {e.split(":", 1)[0] for e in errors}
        more: list[str] = []
        _check(lab, more)
        errors += [e for e in more if not any(
            e.split(":", 1)[0] == r or e.startswith(r + ".") for r in reported)]
    if errors:
        first = f"{name}: {errors[0]}"
        raise LabError(first if len(errors) == 1 else f"{name}: {len(errors)} problems; fix them and rerun",
                       [] if len(errors) == 1 else [f"{name}: {e}" for e in errors])
    return lab


def _named(value: Any, where: str, errors: list[str], defaults: dict) -> list:
    if value is None:
        return []
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping of name: settings, got {_tname(value)}")
        return []
    out = []
    for key, body in value.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            errors.append(f"{where}.{key}: expected a mapping, got {_tname(body)}")
            continue
        if "name" in body:
            errors.append(f"{where}.{key}.name: the name is the key; remove this field")
            continue
        out.append({**defaults, **body, "name": str(key)})
    return out


def _show(v: Any) -> str:
    """A value as the user wrote it."""
    text = getattr(v, "yaml_text", None)
    return text if text is not None else repr(v)


def _tname(v: Any) -> str:
    if isinstance(v, _Bool):
        return "true/false"
    for t, name in ((bool, "true/false"), (dict, "a mapping"), (list, "a list"), (str, "a string"),
                    (int, "a number"), (float, "a number"), (type(None), "nothing")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _convert(tp: Any, value: Any, where: str, errors: list[str]) -> Any:
    """Convert ``value`` to ``tp``; append "where: problem" to ``errors``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    label = where or "top level"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{label}: expected a mapping, got {_tname(value)}")
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)
                  if not (tp is Lab and f.name in ("source", "raw"))}
        kwargs = {}
        for key, v in value.items():
            sub = f"{where}.{key}" if where else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key).replace("-", "_"), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else \
                    f" (known: {', '.join(sorted(fields))})"
                errors.append(f"{sub}: unknown key{hint}")
                continue
            conv = _convert(hints[key], v, sub, errors)
            if conv is not None or v is None:
                kwargs[key] = conv
        try:
            return tp(**kwargs)
        except TypeError as exc:  # pragma: no cover - schema bug
            errors.append(f"{label}: {exc}")
            return None
    if origin is tuple:
        item_tp = args[0]
        if isinstance(value, (str, int)) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            errors.append(f"{label}: expected a list, got {_tname(value)}")
            return None
        items = []
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) and "name" in item and where in ("hosts", "networks") else None
            sub = f"{where}.{name}" if name else f"{where}[{i}]"
            conv = _convert(item_tp, item, sub, errors)
            if conv is not None:
                items.append(conv)
        return tuple(items)
    if origin is Literal:
        if isinstance(value, _Bool):
            value = value.yaml_text     # `visibility: on` is never a visibility
        if value not in args or type(value) is not type(args[0]):
            errors.append(f"{label}: {_show(value)} is not one of {', '.join(map(str, args))}")
            return None
        return value
    if isinstance(value, _Bool) and tp is not bool:
        errors.append(f"{label}: YAML reads the unquoted {value.yaml_text} as "
                      f"{str(value.value).lower()}; write \"{value.yaml_text}\" in quotes")
        return None
    if tp is bool:
        if isinstance(value, _Bool):
            return value.value
        if not isinstance(value, bool):
            errors.append(f"{label}: expected true or false, got {_show(value)}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{label}: expected a whole number, got {_show(value)}")
            return None
        return int(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            errors.append(f"{label}: expected a string, got {_tname(value)}")
            return None
        text = getattr(value, "yaml_text", None)
        if text is not None and text != str(value):
            # 0644 -> 420, 24.10 -> 24.1, 52:54:00:12:34:56 -> 677919...: never meant
            errors.append(f"{label}: YAML reads the unquoted {text} as the number {value!r}; "
                          f"write \"{text}\" in quotes")
            return None
        return str(int(value) if isinstance(value, _Int) else
                   float(value) if isinstance(value, _Float) else value)
    if tp is IPv4Address:
        try:
            return IPv4Address(str(value))
        except ValueError:
            errors.append(f"{label}: {value!r} is not an IPv4 address")
            return None
    if tp is IPv4Network:
        try:
            return IPv4Network(str(value), strict=True)
        except ValueError as exc:
            errors.append(f"{label}: {value!r} is not a network in CIDR form ({exc})")
            return None
    raise TypeError(f"lab schema: unsupported type {tp!r} at {where}")  # pragma: no cover


def _check(lab: Lab, errors: list[str]) -> None:
    """Checks that span fields: names, addresses, references."""
    if not _DNS_LABEL.match(lab.name):
        errors.append(f"name: {lab.name!r} is not a valid DNS label (a-z, 0-9, '-', at most 63)")
    if lab.domain is not None and not _DNS_NAME.match(lab.domain):
        errors.append(f"domain: {lab.domain!r} is not a valid DNS domain name")
    if not lab.networks and lab.hosts:
        errors.append("networks: at least one network is needed for the hosts' addresses")
    nets = {n.name: n for n in lab.networks}
    for n in lab.networks:
        w = f"networks.{n.name}"
        if not _DNS_LABEL.match(n.name):
            errors.append(f"{w}: {n.name!r} is not a valid network name (a-z, 0-9, '-')")
        if n.gateway is not None and n.gateway not in n.cidr:
            errors.append(f"{w}.gateway: {n.gateway} is not in {n.cidr}")
        if n.bridge is not None and not re.match(r"^[A-Za-z0-9_.-]{1,15}$", n.bridge):
            errors.append(f"{w}.bridge: {n.bridge!r} is not a valid Linux interface name (max 15 chars)")
    for a, b in _pairs(lab.networks):
        if a.cidr.overlaps(b.cidr):
            errors.append(f"networks.{b.name}.cidr: {b.cidr} overlaps network {a.name} ({a.cidr})")
    seen_ip: dict[IPv4Address, str] = {}
    seen_mac: dict[str, str] = {}
    for h in lab.hosts:
        w = f"hosts.{h.name}"
        if not _DNS_LABEL.match(h.name):
            errors.append(f"{w}: {h.name!r} is not a valid hostname (a DNS label: a-z, 0-9, "
                          "'-', not at either end, at most 63 characters)")
        try:
            net = lab.host_network(h)
        except LabError:
            net = None                  # reported below (unknown name) or above (no networks)
        if h.network and net is None:
            errors.append(f"{w}.network: no network named {h.network!r} (networks: "
                          f"{', '.join(nets) or 'none'})")
        if h.ip == IPv4Address("0.0.0.0"):
            errors.append(f"{w}.ip: missing; give the host's address on its lab network")
        elif net is not None:
            if h.ip not in net.cidr:
                errors.append(f"{w}.ip: {h.ip} is not in network {net.name} ({net.cidr})")
            elif h.ip in (net.cidr.network_address, net.cidr.broadcast_address):
                errors.append(f"{w}.ip: {h.ip} is the network or broadcast address of {net.cidr}")
            elif net.gateway is not None and h.ip == net.gateway:
                errors.append(f"{w}.ip: {h.ip} is the gateway of network {net.name}")
        if h.ip in seen_ip and h.ip != IPv4Address("0.0.0.0"):
            errors.append(f"{w}.ip: {h.ip} is already used by host {seen_ip[h.ip]}")
        seen_ip.setdefault(h.ip, h.name)
        if h.mac is not None:
            if not _MAC.match(h.mac.lower()):
                errors.append(f"{w}.mac: {h.mac!r} is not a MAC address like 52:54:00:12:34:56")
            elif int(h.mac[:2], 16) & 1:
                errors.append(f"{w}.mac: {h.mac} is a multicast address (the first byte is odd); "
                              "a NIC needs a unicast one like 52:54:00:12:34:56")
            elif h.mac.lower() == "00:00:00:00:00:00":
                errors.append(f"{w}.mac: {h.mac} is all zeros; give a unicast address like "
                              "52:54:00:12:34:56 or leave mac out")
            elif h.mac.lower() in seen_mac:
                errors.append(f"{w}.mac: {h.mac} is already used by host {seen_mac[h.mac.lower()]}")
            else:
                seen_mac[h.mac.lower()] = h.name
        if not 1 <= h.cpus <= 256:
            errors.append(f"{w}.cpus: {h.cpus} is out of range (1-256)")
        if not 128 <= h.memory <= 4 * 1024 * 1024:
            errors.append(f"{w}.memory: {h.memory} MiB is out of range (128 MiB - 4 TiB)")
        if not 1 <= h.disk <= 65536:
            errors.append(f"{w}.disk: {h.disk} GiB is out of range (1-65536)")
        for i, san in enumerate(h.extra_sans):
            if not (_is_ip(san) or _DNS_NAME.match(san.lower().lstrip("*."))):
                errors.append(f"{w}.extra_sans[{i}]: {san!r} is neither an IP address nor a DNS name")
        for i, wf in enumerate(h.write_files):
            ww = f"{w}.write_files[{i}]"
            if not wf.path.startswith("/"):
                errors.append(f"{ww}.path: {wf.path!r} must be an absolute path in the guest")
            if (wf.source is None) == (wf.content is None):
                errors.append(f"{ww}: give exactly one of source or content")
            if not re.match(r"^0?[0-7]{3}$", wf.permissions):
                errors.append(f"{ww}.permissions: {wf.permissions!r} is not an octal mode like 0644")
        for i, role in enumerate(h.roles):
            if role not in ROLES:
                close = difflib.get_close_matches(role, ROLES, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(ROLES)}"
                errors.append(f"{w}.roles[{i}]: {role!r} is not a role labforge knows ({hint})")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", h.image) or ".." in h.image:
            errors.append(f"{w}.image: {h.image!r} is not an image name like debian-12 "
                          "(artifacts/images/NAME.qcow2)")
        _check_seed_host(h, w, errors)
    names = {h.name for h in lab.hosts}
    for i, b in enumerate(lab.kafka.brokers):
        if b not in names:
            errors.append(f"kafka.brokers[{i}]: no host named {b!r}")
    if not _CN.match(lab.kafka.client):
        errors.append(f"kafka.client: {lab.kafka.client!r} is not a valid identity name "
                      "(letters, digits, '.', '_', '-')")
    if not 1 <= lab.kafka.port <= 65535:
        errors.append(f"kafka.port: {lab.kafka.port} is not a TCP port")
    if lab.kafka.client in names:
        errors.append(f"kafka.client: {lab.kafka.client!r} is also a host name; the client "
                      "identity needs its own name")
    if lab.kafka.client in ("ca", "truststore", "store", "client-bundle"):
        errors.append(f"kafka.client: {lab.kafka.client!r} is reserved for a file in certs/kafka")
    if not lab.kafka.ssl_dir.startswith("/"):
        errors.append(f"kafka.ssl_dir: {lab.kafka.ssl_dir!r} must be an absolute path on the hosts")
    if lab.pki.key_type == "rsa" and lab.pki.rsa_bits not in (2048, 3072, 4096):
        errors.append(f"pki.rsa_bits: {lab.pki.rsa_bits} is not one of 2048, 3072, 4096")
    if not 1 <= lab.pki.leaf_days <= lab.pki.ca_days:
        errors.append(f"pki.leaf_days: {lab.pki.leaf_days} must be between 1 and pki.ca_days "
                      f"({lab.pki.ca_days})")
    if not 1 <= lab.pki.ca_days <= 36500:
        errors.append(f"pki.ca_days: {lab.pki.ca_days} is out of range (1-36500)")
    for i, hm in enumerate(lab.octavia.health_managers):
        ip, _, port = hm.rpartition(":")
        if not (_is_ip(ip.strip("[]")) and port.isdigit() and 0 < int(port) < 65536):
            errors.append(f"octavia.health_managers[{i}]: {hm!r} is not ADDRESS:PORT "
                          "like 10.100.0.5:5555")
    key_name = lab.octavia.amp_ssh_key_name
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", key_name) or key_name in (".", ".."):
        errors.append(f"octavia.amp_ssh_key_name: {key_name!r} is not a valid "
                      "key pair name (letters, digits, '.', '_', '-')")
    elif key_name in OCTAVIA_FILES or f"{key_name}.pub" in OCTAVIA_FILES:
        errors.append(f"octavia.amp_ssh_key_name: {key_name!r} is the name of another file in "
                      "certs/octavia/; choose another name (default octavia_ssh_key)")
    for key in ("amp_boot_network_list", "amp_secgroup_list", "amp_flavor_id"):
        value = getattr(lab.octavia, key)
        for i, v in enumerate(value if isinstance(value, tuple) else () if value is None else (value,)):
            if not re.match(r"^[A-Za-z0-9_.:-]{1,255}$", v):
                where = f"octavia.{key}[{i}]" if isinstance(value, tuple) else f"octavia.{key}"
                errors.append(f"{where}: {v!r} is not a cloud ID (letters, digits, '-', '_', '.', ':')")
    if not 1 <= lab.octavia.cert_validity_days <= lab.pki.ca_days:
        errors.append(f"octavia.cert_validity_days: {lab.octavia.cert_validity_days} must be "
                      f"between 1 and pki.ca_days ({lab.pki.ca_days})")
    if not re.match(r"^[A-Za-z0-9_.:-]{1,255}$", lab.octavia.amp_image_tag):
        errors.append(f"octavia.amp_image_tag: {lab.octavia.amp_image_tag!r} is not a valid Glance tag")
    if not 1 <= lab.octavia.amphora.size <= 100:
        errors.append(f"octavia.amphora.size: {lab.octavia.amphora.size} GB is out of range (1-100)")
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", lab.user.name):
        errors.append(f"user.name: {lab.user.name!r} is not a Linux user name (a-z, 0-9, '_', "
                      "'-', starting with a letter or '_', at most 32)")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", lab.vagrant.management_network):
        errors.append(f"vagrant.management_network: {lab.vagrant.management_network!r} is not a "
                      "libvirt network name (letters, digits, '_', '.', '-')")
    if not re.match(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$", lab.vagrant.box, re.I):
        errors.append(f"vagrant.box: {lab.vagrant.box!r} is not ORG/NAME")
    if not 1 <= lab.glance.timeout <= 86400:
        errors.append(f"glance.timeout: {lab.glance.timeout} is out of range (1-86400 seconds)")
    if lab.glance.keep is not None and lab.glance.keep < 1:
        errors.append(f"glance.keep: {lab.glance.keep} keeps no image; use 1 or more (the new one counts)")
    if not errors:
        _check_collisions(lab, errors)
    _check_files(lab, errors)


# --------------------------------------------------------------------------
# output names: no two outputs may land on one file
# --------------------------------------------------------------------------
KAFKA_FIXED = ("ca.crt", "ca.key", "truststore.p12", "truststore.jks", "store.password",
               "client-ssl.properties", "client-bundle.pem")
KAFKA_LEAF = ("{n}.crt", "{n}.key", "{n}-chain.pem", "{n}.keystore.p12", "{n}.keystore.jks")


def outputs(lab: Lab) -> list[tuple[str, str]]:
    """Every file the builders derive from the lab's names, as (path under the
    workspace, what it is), fixed names included: certs/kafka (the builders'
    certs/kafka.py module doc), certs/octavia, certs/ssh, seeds, overlays,
    libvirt and Vagrant XML.  Boxes and base images are named from one lab
    value each and cannot meet (a test keeps this list and the builders the
    same)."""
    out: list[tuple[str, str]] = []
    out += [(f"certs/kafka/{f}", "the Kafka CA" if f.startswith("ca.") else "the Kafka stores")
            for f in KAFKA_FIXED]
    for n in lab.networks:      # before the hosts: a host named net-X is the one to rename
        out += [(f"artifacts/libvirt/net-{n.name}.xml", f"network {n.name}"),
                (f"artifacts/vagrant/networks/{n.name}.xml", f"network {n.name}")]
    brokers = [h.name for h in lab.hosts if "kafka-broker" in h.roles] \
        if not lab.kafka.brokers else list(lab.kafka.brokers)
    for n, what in [*((b, f"broker {b}") for b in brokers),
                    (lab.kafka.client, f"kafka.client {lab.kafka.client}")]:
        out += [(f"certs/kafka/{t.format(n=n)}", what) for t in KAFKA_LEAF]
    out += [(f"certs/kafka/server-{b}.properties", f"broker {b}") for b in brokers]
    out += [(f"certs/octavia/{f}", "the Octavia certificates") for f in sorted(OCTAVIA_FILES)]
    key = lab.octavia.amp_ssh_key_name
    out += [(f"certs/octavia/{key}", "octavia.amp_ssh_key_name"),
            (f"certs/octavia/{key}.pub", "octavia.amp_ssh_key_name")]
    out += [("certs/ssh/lab_ed25519", "the lab SSH key"), ("certs/ssh/lab_ed25519.pub", "the lab SSH key")]
    out += [("certs/seed/state.json", "the seed state")]
    for h in lab.hosts:
        what = f"host {h.name}"
        for ext in (".iso", ".img"):
            out += [(f"artifacts/seed/{h.name}{ext}", what), (f"certs/seed/{h.name}{ext}", what)]
        out += [(f"artifacts/vms/{h.name}.qcow2", what),
                (f"artifacts/libvirt/{h.name}.xml", what),
                (f"artifacts/libvirt/{h.name}-volume.xml", what),
                (f"artifacts/logs/boot-{h.name}.console.log", what)]
    return out


def _check_collisions(lab: Lab, errors: list[str]) -> None:
    owner: dict[str, str] = {}
    reported: set[tuple[str, str]] = set()
    for path, what in outputs(lab):
        first = owner.setdefault(path, what)
        if first != what and (first, what) not in reported:
            reported.add((first, what))
            errors.append(f"{_field_of(what)}: the name would make {what} write {path}, the "
                          f"file of {first}; choose another name")


def _field_of(what: str) -> str:
    kind, _, name = what.partition(" ")
    return {"broker": f"hosts.{name}", "host": f"hosts.{name}",
            "network": f"networks.{name}"}.get(kind, what.split(" ")[0])


# --------------------------------------------------------------------------
# files the lab names: what they must be
# --------------------------------------------------------------------------
def file_values(lab: Lab) -> list[tuple[str, str, str, int]]:
    """(field, value, kind, size limit) of every key naming a local file; kind
    is "file", "public-key", "private-key" or "pem-bundle"."""
    out = []
    for h in lab.hosts:
        w = f"hosts.{h.name}"
        for i, k in enumerate(h.ssh_authorized_keys):
            out.append((f"{w}.ssh_authorized_keys[{i}]", k, "public-key", KEY_FILE_LIMIT))
        for key in ("user_data", "vendor_data", "network_config"):
            v = getattr(h, key)
            if v is not None:
                out.append((f"{w}.{key}", v, "file", SEED_FILE_LIMIT))
        for i, wf in enumerate(h.write_files):
            if wf.source is not None and not wf.source.startswith("certs:"):
                out.append((f"{w}.write_files[{i}].source", wf.source, "file", SOURCE_FILE_LIMIT))
    if lab.kafka.password_file:
        out.append(("kafka.password_file", lab.kafka.password_file, "file", PASSWORD_FILE_LIMIT))
    if lab.vagrant.ssh_private_key:
        out.append(("vagrant.ssh_private_key", lab.vagrant.ssh_private_key, "private-key",
                    KEY_FILE_LIMIT))
    if lab.build.ca_bundle:
        out.append(("build.ca_bundle", lab.build.ca_bundle, "pem-bundle", BUNDLE_FILE_LIMIT))
    return out


def _check_files(lab: Lab, errors: list[str]) -> None:
    """Files the lab names that exist must be what the key needs: a regular
    file of sane size, a public key where one is authorized, a private key
    where one signs in.  A missing file is left to the task that reads it (a
    lab may name a file that `invoke certs` makes later)."""
    import os
    import stat as stat_
    from builders.core.fsutil import file_kind
    for where, value, kind, limit in file_values(lab):
        p = lab.path(value)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not stat_.S_ISREG(st.st_mode):
            errors.append(f"{where}: {p} is {file_kind(st.st_mode)}; name a regular file")
            continue
        if st.st_size > limit:
            errors.append(f"{where}: {p} is {st.st_size} bytes, more than the {limit} "
                          "labforge reads for it; is it the right file?")
            continue
        if kind == "file":
            continue
        try:
            with open(p, "rb") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if kind == "public-key" and b"PRIVATE KEY-----" in head:
            errors.append(f"{where}: {p} is a private key; name the .pub file")
        elif kind == "private-key" and (p.suffix == ".pub" or head.lstrip().startswith(
                (b"ssh-", b"ecdsa-", b"sk-"))):
            errors.append(f"{where}: {p} is a public key; name the private key (without .pub)")
        elif kind == "private-key" and b"PRIVATE KEY-----" not in head:
            errors.append(f"{where}: {p} is not a private key (no PRIVATE KEY block)")
        elif kind == "pem-bundle" and b"-----BEGIN CERTIFICATE-----" not in head \
                and b"-----BEGIN CERTIFICATE-----" not in _read_some(p, limit):
            errors.append(f"{where}: {p} holds no PEM certificate; name a CA bundle such as "
                          "/etc/ssl/certs/ca-certificates.crt")


def _read_some(p: Path, limit: int) -> bytes:
    try:
        return read_regular(p, "the file", limit)
    except (OSError, LabError):
        return b""


def _check_seed_host(h: Host, w: str, errors: list[str]) -> None:
    """seed-iso: the NIC names network-config will use."""
    nic = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
    if h.interface is not None and not nic.match(h.interface):
        errors.append(f"{w}.interface: {h.interface!r} is not a Linux interface name "
                      "(letters, digits, '_', '.', '-', at most 15)")
    elif h.dhcp_interface and not nic.match(h.dhcp_interface):
        errors.append(f"{w}.dhcp_interface: {h.dhcp_interface!r} is not a Linux interface name "
                      "(globs are not rendered by cloud-init's eni/networkd renderers)")
    elif h.dhcp_interface and h.dhcp_interface == (h.interface or ("lab0" if h.mac else "eth1")):
        errors.append(f"{w}.dhcp_interface: {h.dhcp_interface!r} is also the lab NIC; "
                      f"set hosts.{h.name}.interface to another name or dhcp_interface: \"\"")


def _pairs(items):
    items = list(items)
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            yield a, b


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
