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
import functools
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
class Nic:
    """One NIC of a host: on a named lab network, with its address and MAC.

    On a network with ``dhcp: true`` the address is a DHCP reservation for
    the MAC (libvirt's network XML) and the guest asks DHCP for it; on
    other networks the guest sets it statically.  network-config matches
    the NIC by MAC."""
    network: str = ""                      # a lab network's name
    ip: IPv4Address = IPv4Address("0.0.0.0")
    mac: str | None = None                 # required when a host has several NICs
    name: str | None = None                # interface name set in the guest (set-name)


@dataclass(frozen=True)
class Host:
    name: str = ""
    # one NIC, the short way: ip, network, mac, interface (see nics for several)
    ip: IPv4Address = IPv4Address("0.0.0.0")
    network: str = ""                      # default: the lab's first network
    mac: str | None = None                 # lab NIC MAC; network-config matches on it
    # several NICs, in the order the VM gets them (the first is the one
    # Vagrant manages and SSH reaches); after loading, every host has nics,
    # and ip/mac are those of its NIC on `network` (its lab address)
    nics: tuple[Nic, ...] = ()
    zookeeper_id: int | None = None        # myid, broker.id / node.id; default: position in the brokers
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
    mode: Literal["zookeeper", "kraft"] = "zookeeper"  # metadata: a ZooKeeper ensemble or KRaft
    # the networks Kafka uses (default: the lab's first network): the TLS
    # listener (clients, port) and the PLAINTEXT one that carries inter-broker
    # and ZooKeeper (or KRaft controller) traffic (plaintext_port)
    tls_network: str | None = None
    internal_network: str | None = None
    plaintext_port: int = 9092
    controller_port: int = 9094            # kraft: the controller listener
    zookeeper_port: int = 2281             # ZooKeeper's TLS client port (client auth required)
    cluster_id: str | None = None          # kraft: 22 characters base64url; default: from the lab name
    log_dirs: str = "/var/lib/kafka/data"


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
    packages: tuple[str, ...] = ()         # more Debian packages baked in (`build` source)
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
    # libvirt domain type: auto = kvm where KVM runs guests here, else qemu
    # (TCG), decided as boot-check decides
    driver: Literal["auto", "kvm", "qemu"] = "auto"


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

    def nic_on(self, host: Host, network: str) -> Nic | None:
        """The host's NIC on the named network, if it has one."""
        return next((n for n in host.nics if n.network == network), None)

    def kafka_network(self, role: Literal["tls", "internal"]) -> Network:
        """The network of Kafka's TLS listener, or the internal one (PLAINTEXT,
        inter-broker, ZooKeeper); default: the lab's first network."""
        name = self.kafka.tls_network if role == "tls" else self.kafka.internal_network
        return self.network(name) if name else self.networks[0]

    def kafka_address(self, host: Host, role: Literal["tls", "internal"]) -> IPv4Address:
        """The host's address on the Kafka network of ``role``."""
        nic = self.nic_on(host, self.kafka_network(role).name)
        if nic is None:
            raise LabError(f"{self.source.name}: hosts.{host.name}: no NIC on network "
                           f"{self.kafka_network(role).name} (kafka.{role}_network)")
        return nic.ip

    def zookeeper_id(self, host: Host) -> int:
        """The host's ZooKeeper myid, also its broker.id / node.id."""
        if host.zookeeper_id is not None:
            return host.zookeeper_id
        return [b.name for b in self.brokers()].index(host.name) + 1

    def kafka_cluster_id(self) -> str:
        """KRaft's cluster id: kafka.cluster_id, else one derived from the lab
        name (the same lab always gets the same id, as a UUID in base64url)."""
        if self.kafka.cluster_id:
            return self.kafka.cluster_id
        import base64
        import hashlib
        raw = hashlib.sha256(f"labforge-kafka-cluster:{self.name}".encode()).digest()[:16]
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

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
        lab = _with_nics(lab, errors)
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


@functools.cache
def _schema_of(tp: type) -> tuple[dict, dict]:
    """A dataclass's resolved field types and its fields a lab file may set
    (resolving the string annotations once: a 50-host lab converts a Host 50
    times)."""
    return typing.get_type_hints(tp), {f.name: f for f in dataclasses.fields(tp)
                                       if not (tp is Lab and f.name in ("source", "raw"))}


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
        hints, fields = _schema_of(tp)
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
    _check_nics(lab, errors)
    for h in lab.hosts:
        w = f"hosts.{h.name}"
        if not _DNS_LABEL.match(h.name):
            errors.append(f"{w}: {h.name!r} is not a valid hostname (a DNS label: a-z, 0-9, "
                          "'-', not at either end, at most 63 characters)")
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
    _check_kafka(lab, errors)
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
    for i, pkg in enumerate(lab.base_image.packages):
        if not re.match(r"^[a-z0-9][a-z0-9+.-]+$", pkg):
            errors.append(f"base_image.packages[{i}]: {pkg!r} is not a Debian package name")
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
    out += [("certs/seed/state.json", "the seed state"),
            ("certs/seed/ledger.json", "the secret seeds' ledger")]
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


# --------------------------------------------------------------------------
# NICs
# --------------------------------------------------------------------------
def _raw_host(lab: Lab, h: Host) -> dict:
    """The host's mapping as lab.yaml wrote it, with the defaults under it."""
    raw = lab.raw if isinstance(lab.raw, dict) else {}
    hosts, defaults = raw.get("hosts"), raw.get("defaults")
    body = hosts.get(h.name) if isinstance(hosts, dict) else None
    return {**(defaults if isinstance(defaults, dict) else {}),
            **(body if isinstance(body, dict) else {})}


_SHORT = ("ip", "mac", "interface", "network")


def _short_form(lab: Lab, h: Host) -> bool:
    """True when lab.yaml gives the host one NIC the short way (ip, network,
    mac, interface) instead of a nics list."""
    return "nics" not in _raw_host(lab, h)


def _lab_nic_index(lab: Lab, h: Host) -> int | None:
    """Which NIC the short fields name: the one on hosts.X.network (default:
    the lab's first network)."""
    target = h.network or (lab.networks[0].name if lab.networks else "")
    return next((i for i, n in enumerate(h.nics) if n.network == target), None)


def _with_nics(lab: Lab, errors: list[str]) -> Lab:
    """Every host with its NICs.  The short form (ip, network, mac, interface)
    is one NIC; with a nics list, the short fields, when given, set the NIC
    on hosts.X.network (default: the lab's first network), adding it if
    there is none.  Either way ip and mac end up as that NIC's: the host's
    address on its lab network, which code that knows one address uses."""
    first = lab.networks[0].name if lab.networks else ""
    hosts = []
    for h in lab.hosts:
        target = h.network or first
        if _short_form(lab, h):
            nic = Nic(network=target, ip=h.ip, mac=h.mac, name=h.interface)
            hosts.append(dataclasses.replace(h, nics=(nic,)))
            continue
        if not h.nics:
            errors.append(f"hosts.{h.name}.nics: empty; give at least one NIC "
                          "(network, ip, mac)")
            hosts.append(h)
            continue
        nics = list(h.nics)
        raw = _raw_host(lab, h)
        if target not in {n.name for n in lab.networks}:
            errors.append(f"hosts.{h.name}.network: no network named {target!r} (networks: "
                          f"{', '.join(n.name for n in lab.networks) or 'none'})")
        elif any(k in raw for k in _SHORT):
            i = next((i for i, n in enumerate(nics) if n.network == target), None)
            base = nics[i] if i is not None else Nic(network=target)
            nic = dataclasses.replace(
                base,
                ip=h.ip if "ip" in raw else base.ip,
                mac=h.mac if "mac" in raw else base.mac,
                name=h.interface if "interface" in raw else base.name)
            if i is None:
                nics.append(nic)
            else:
                nics[i] = nic
        lab_nic = next((n for n in nics if n.network == target), nics[0])
        hosts.append(dataclasses.replace(h, nics=tuple(nics), ip=lab_nic.ip, mac=lab_nic.mac))
    return dataclasses.replace(lab, hosts=tuple(hosts))


def _check_nics(lab: Lab, errors: list[str]) -> None:
    """Each NIC on an existing network, with a free address in it; MACs unique
    over every NIC of the lab; several NICs need a MAC each and one network each."""
    nets = {n.name: n for n in lab.networks}
    seen_ip: dict[IPv4Address, str] = {}
    seen_mac: dict[str, str] = {}
    for h in lab.hosts:
        raw = _raw_host(lab, h)
        short_i = 0 if _short_form(lab, h) else \
            (_lab_nic_index(lab, h) if any(k in raw for k in _SHORT) else None)
        on_net: dict[str, str] = {}
        for i, nic in enumerate(h.nics):
            short = i == short_i
            w = f"hosts.{h.name}" if short else f"hosts.{h.name}.nics[{i}]"
            owner = f"host {h.name}" if short or len(h.nics) == 1 else \
                f"host {h.name} (nics[{i}])"
            net = nets.get(nic.network)
            if net is None and (nic.network or not short):
                what = f"no network named {nic.network!r}" if nic.network else "missing"
                errors.append(f"{w}.network: {what} (networks: {', '.join(nets) or 'none'})")
            if nic.ip == IPv4Address("0.0.0.0"):
                errors.append(f"{w}.ip: missing; give the host's address on its lab network")
            elif net is not None:
                if nic.ip not in net.cidr:
                    errors.append(f"{w}.ip: {nic.ip} is not in network {net.name} ({net.cidr})")
                elif nic.ip in (net.cidr.network_address, net.cidr.broadcast_address):
                    errors.append(f"{w}.ip: {nic.ip} is the network or broadcast address of "
                                  f"{net.cidr}")
                elif net.gateway is not None and nic.ip == net.gateway:
                    errors.append(f"{w}.ip: {nic.ip} is the gateway of network {net.name}")
            if nic.ip in seen_ip and nic.ip != IPv4Address("0.0.0.0"):
                errors.append(f"{w}.ip: {nic.ip} is already used by {seen_ip[nic.ip]}")
            seen_ip.setdefault(nic.ip, owner)
            if nic.mac is not None:
                if not _MAC.match(nic.mac.lower()):
                    errors.append(f"{w}.mac: {nic.mac!r} is not a MAC address like "
                                  "52:54:00:12:34:56")
                elif int(nic.mac[:2], 16) & 1:
                    errors.append(f"{w}.mac: {nic.mac} is a multicast address (the first byte is "
                                  "odd); a NIC needs a unicast one like 52:54:00:12:34:56")
                elif nic.mac.lower() == "00:00:00:00:00:00":
                    errors.append(f"{w}.mac: {nic.mac} is all zeros; give a unicast address like "
                                  "52:54:00:12:34:56 or leave mac out")
                elif nic.mac.lower() in seen_mac:
                    errors.append(f"{w}.mac: {nic.mac} is already used by "
                                  f"{seen_mac[nic.mac.lower()]}; every NIC needs its own MAC")
                else:
                    seen_mac[nic.mac.lower()] = owner
            elif len(h.nics) > 1:
                errors.append(f"{w}.mac: missing; a host with several NICs needs a MAC on each "
                              "(network-config matches NICs by MAC, as the guest names them "
                              "unpredictably)")
            if nic.name is not None and not short and \
                    not re.match(r"^[A-Za-z0-9_.-]{1,15}$", nic.name):
                errors.append(f"{w}.name: {nic.name!r} is not a Linux interface name "
                              "(letters, digits, '_', '.', '-', at most 15)")
            if nic.network in on_net:
                errors.append(f"{w}.network: {h.name} already has a NIC on {nic.network} "
                              f"({on_net[nic.network]}); one NIC per network")
            on_net.setdefault(nic.network, w)


# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def _check_kafka(lab: Lab, errors: list[str]) -> None:
    """The listener networks exist and every broker has an address on them;
    ZooKeeper ids are unique; ports and the KRaft cluster id are sane."""
    k = lab.kafka
    nets = {n.name for n in lab.networks}
    roles = {"tls": "Kafka's TLS listener", "internal": "Kafka's inter-broker and "
             + ("ZooKeeper" if k.mode == "zookeeper" else "KRaft controller") + " traffic"}
    usable = []
    for role, what in roles.items():
        name = getattr(k, f"{role}_network")
        if name is not None and name not in nets:
            errors.append(f"kafka.{role}_network: no network named {name!r} (networks: "
                          f"{', '.join(sorted(nets)) or 'none'}); name the network that carries "
                          f"{what}")
        elif lab.networks:
            usable.append(role)
    names = {h.name for h in lab.hosts}
    brokers = [h for h in lab.hosts if h.name in k.brokers] if k.brokers else \
        [h for h in lab.hosts if "kafka-broker" in h.roles]
    brokers = [h for h in brokers if h.name in names]
    for h in brokers:
        if any(e.startswith((f"hosts.{h.name}.", f"hosts.{h.name}:")) for e in errors):
            continue            # the host is reported already
        for role in usable:
            net = lab.kafka_network(role)
            if lab.nic_on(h, net.name) is None:
                errors.append(f"hosts.{h.name}: broker {h.name} has no address on network "
                              f"{net.name}, which carries {roles[role]} (kafka.{role}_network); "
                              f"add a NIC on {net.name}")
    seen: dict[int, str] = {}
    for h in lab.hosts:
        if h.zookeeper_id is None:
            continue
        if not 1 <= h.zookeeper_id <= 255:
            errors.append(f"hosts.{h.name}.zookeeper_id: {h.zookeeper_id} is out of range (1-255)")
    for pos, h in enumerate(brokers, start=1):
        zid = h.zookeeper_id if h.zookeeper_id is not None else pos
        if zid in seen:
            errors.append(f"hosts.{h.name}.zookeeper_id: {zid} is also broker {seen[zid]}'s "
                          "ZooKeeper id; give each broker its own")
        else:
            seen[zid] = h.name
    ports = {"port": k.port, "plaintext_port": k.plaintext_port,
             "controller_port": k.controller_port, "zookeeper_port": k.zookeeper_port}
    used: dict[int, str] = {}
    for key, port in ports.items():
        if not 1 <= port <= 65535:
            errors.append(f"kafka.{key}: {port} is not a TCP port")
        elif port in used and key != "port":
            errors.append(f"kafka.{key}: {port} is also kafka.{used[port]}; give each "
                          "listener its own port")
        used.setdefault(port, key)
    if k.cluster_id is not None and not _CLUSTER_ID.match(k.cluster_id):
        errors.append(f"kafka.cluster_id: {k.cluster_id!r} is not a Kafka cluster id (22 "
                      "characters of base64url, as `kafka-storage.sh random-uuid` prints)")
    if not k.log_dirs.startswith("/"):
        errors.append(f"kafka.log_dirs: {k.log_dirs!r} must be an absolute path on the hosts")


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
