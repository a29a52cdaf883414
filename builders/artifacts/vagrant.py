"""Vagrant: libvirt boxes from built images, a versioned box catalog, and the
lab's Vagrantfile with the libvirt network XML it needs.

Box (``artifacts/boxes/<org>-<name>-<version>.box``)
    A plain POSIX tar of ``metadata.json``, ``Vagrantfile`` and ``box.img``,
    the layout vagrant-libvirt expects.  ``box.img`` is the qcow2 as it is,
    or flattened with ``qemu-img convert`` when it has a backing file.  The
    tar is not gzipped: a qcow2 already stores only allocated clusters (and
    diskimage-builder compresses them), so a gzip pass costs minutes of CPU
    at packing time and again at every ``vagrant box add`` for little gain.
    The tar is streamed in constant memory and hashed (sha256) while it is
    written, so the checksum costs no second read.

Catalog (``artifacts/boxes/<org>-<name>.json``)
    Vagrant's box metadata format: name, versions, one ``libvirt`` provider
    per version with url, ``checksum_type: sha256``, checksum, and
    ``architecture`` / ``default_architecture`` (read by Vagrant >= 2.4,
    ignored by older Vagrant such as Debian 12's 2.3.4).  A new version is
    added in place (atomic rewrite), so ``vagrant box outdated`` and
    ``vagrant box update`` see it.  URLs are absolute ``file://`` URLs
    (Vagrant 2.3.4 resolves a relative URL against its own working
    directory, not against the catalog), or ``base_url`` + file name when
    the boxes are published on a web server.

Vagrantfile and networks (``artifacts/vagrant/``)
    One machine per lab host and one libvirt network XML per lab network
    (``networks/<name>.xml``), to be defined with ``virsh net-define`` and
    started with ``virsh net-start`` before ``vagrant up``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from builders.artifacts import seediso
from builders.artifacts.baseimage import qemu_check
from builders.core.console import log, progress
from builders.artifacts import labnet
from builders.core.errors import LabError
from builders.core.fsutil import atomic_path, atomic_write, remove_stale_parts
from builders.core.lab import Host, Lab, Network
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.extcmd import run, tool_version
from builders.core.workspace import BuildLock, Workspace

# Bump when the box layout, box Vagrantfile, catalog or templates change:
# it is part of every input digest, so outputs are rebuilt.
FORMAT = "labforge-vagrant-1"

IMAGE_KINDS = ("base-image", "amphora")
BOX_KIND = "vagrant-box"
CATALOG_KIND = "vagrant-catalog"
VAGRANTFILE_KIND = "vagrantfile"
NETWORK_KIND = "libvirt-network"

BOX_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,63}$", re.I)
VERSION_RE = re.compile(r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})$")
QCOW2_MAGIC = b"QFI\xfb"
GIB = 1024 ** 3
BUF = 4 << 20                 # 4 MiB copy buffer: constant memory, few syscalls
BLOCK = tarfile.BLOCKSIZE     # 512
RECORD = tarfile.RECORDSIZE   # 10240: tar files end on a record boundary
# tar member mtime: fixed, so the same inputs give the same box (and checksum)
MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "946684800"))

# vagrant-libvirt names for what `uname -m`-style image metadata may say
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------
def check_box_name(name: str, where: str = "--name") -> str:
    if not BOX_NAME_RE.match(name or ""):
        raise LabError(f"{where} {name!r}: not a box name like ORG/NAME (letters, digits, "
                       "'.', '_', '-'; e.g. labforge/debian-12)")
    return name


def check_version(version: str, where: str = "--version") -> str:
    if not VERSION_RE.match(version or ""):
        raise LabError(f"{where} {version!r}: not a box version like 1.2.3 "
                       "(MAJOR.MINOR.PATCH, digits only)")
    return version


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if VERSION_RE.match(version) else (-1,)


def box_stem(name: str) -> str:
    """``org/name`` -> ``org-name``: a safe file name stem (the name is checked)."""
    org, _, short = check_box_name(name).partition("/")
    return f"{org}-{short}"


def box_path(ws: Workspace, name: str, version: str) -> Path:
    return ws.artifacts / "boxes" / f"{box_stem(name)}-{version}.box"


def catalog_path(ws: Workspace, name: str) -> Path:
    return ws.artifacts / "boxes" / f"{box_stem(name)}.json"


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
def resolve_image(ws: Workspace, image: str) -> tuple[Path, dict | None]:
    """An --image argument: an existing file (recorded in the manifest or
    not), or the name of a base image / amphora recorded in the manifest."""
    if not image:
        raise LabError("--image: missing; give a qcow2 path or the name of a built image "
                       "(e.g. debian-12)")
    manifest = Manifest(ws.artifacts)
    looks_like_path = os.sep in image or image.endswith((".qcow2", ".img", ".raw"))
    try:
        return manifest.resolve(image, kinds=IMAGE_KINDS)
    except LabError:
        if looks_like_path:
            raise LabError(f"--image {image}: no such image file; build the image first "
                           "or give the path of a qcow2 image") from None
        raise


def image_info(path: Path) -> dict:
    """``qemu-img info`` of an image; LabError unless it is a usable qcow2."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise LabError(f"{path}: no such image file; build the image first") from None
    except OSError as exc:
        raise LabError(f"{path}: cannot read the image: {exc.strerror}") from None
    proc = run(["qemu-img", "info", "--output=json", "-U", path],
               what=f"reading image {path.name}")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"{path}: qemu-img info printed no JSON; is it an image?") from None
    fmt = info.get("format")
    if magic != QCOW2_MAGIC or fmt != "qcow2":
        raise LabError(f"{path}: is a {fmt or 'unknown'} image, not qcow2; vagrant-libvirt boxes "
                       f"need qcow2: convert it with `qemu-img convert -O qcow2 {path} "
                       f"{path.with_suffix('.qcow2')}`")
    # metadata consistency (reads only the qcow2 tables): a truncated or
    # damaged image must not become a box; leaked clusters (status 3) are harmless
    qemu_check(path, "rebuild it")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        bpath = Path(backing)
        if not bpath.is_absolute():
            bpath = path.parent / bpath
        if not bpath.exists():
            raise LabError(f"{path}: its backing file {backing} is missing; rebuild the image "
                           "or restore the backing file")
        info["_backing_path"] = bpath
    return info


def _backing_chain(path: Path) -> list[Path]:
    proc = run(["qemu-img", "info", "--output=json", "-U", "--backing-chain", path],
               what=f"reading image {path.name}")
    try:
        chain = json.loads(proc.stdout)
    except ValueError:
        return [path]
    return [Path(i["filename"]) for i in chain if i.get("filename")]


def _file_digest(ws: Workspace, path: Path) -> str:
    """What identifies an input image's content without reading it: the
    manifest's sha256 when the file is recorded and intact (stat-checked),
    else its path, size and modification time (as make does)."""
    manifest = Manifest(ws.artifacts)
    try:
        rec = manifest.get(path)
    except LabError:
        rec = None
    if rec is not None and manifest.intact(path, rec):
        return "sha256:" + rec["sha256"]
    st = path.stat()
    return f"stat:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


# --------------------------------------------------------------------------
# box contents
# --------------------------------------------------------------------------
def box_metadata(virtual_size_bytes: int) -> dict:
    """metadata.json of a vagrant-libvirt box (virtual_size: whole GB, rounded up)."""
    return {"provider": "libvirt", "format": "qcow2",
            "virtual_size": max(1, math.ceil(virtual_size_bytes / GIB))}


def box_vagrantfile(name: str, version: str) -> str:
    """The Vagrantfile inside the box: provider defaults that a project's
    Vagrantfile overrides (Vagrant merges box, project and user files)."""
    return f"""\
# Defaults of the box {name} {version}, made by labforge for vagrant-libvirt.
# A project's Vagrantfile overrides any of them.
Vagrant.configure("2") do |config|
  # cloud images have neither NFS nor rsync set up for a /vagrant share
  config.vm.synced_folder ".", "/vagrant", disabled: true

  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
    libvirt.video_type = "virtio"
    libvirt.cpus = 2
    libvirt.memory = 1024
  end
end
"""


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.type = tarfile.REGTYPE
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class _HashingWriter:
    """Writes to a file and hashes what it writes (no second read for the
    checksum).  Large chunks are hashed in a worker thread while they are
    written: hashlib and file writes both release the GIL, so the two run
    side by side; each chunk is finished before its buffer is reused."""

    def __init__(self, fh, pool: ThreadPoolExecutor):
        self.fh = fh
        self.pool = pool
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        if len(data) >= 1 << 20:
            hashed = self.pool.submit(self.sha.update, data)
            self.fh.write(data)
            hashed.result()
        else:
            self.sha.update(data)
            self.fh.write(data)
        self.size += len(data)

    def pad(self, boundary: int) -> None:
        rest = self.size % boundary
        if rest:
            self.write(bytes(boundary - rest))


def pack_box(out: Path, members: list[tuple[str, bytes | Path]], label: str = "packing box") -> tuple[str, int]:
    """Write a plain tar of ``members`` (name, bytes or file) to ``out``.

    Streams files in 4 MiB chunks (constant memory), shows progress, and
    returns (sha256, size) of the tar as written.
    """
    total = sum(len(d) if isinstance(d, bytes) else d.stat().st_size for _, d in members)
    buf = bytearray(BUF)
    view = memoryview(buf)
    with open(out, "wb") as fh, progress(label, total) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        w = _HashingWriter(fh, pool)
        for name, data in members:
            if isinstance(data, bytes):
                w.write(_tar_header(name, len(data)))
                w.write(data)
                bar.advance(len(data))
            else:
                with open(data, "rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    w.write(_tar_header(name, size))
                    left = size
                    while left:
                        n = src.readinto(view[:min(BUF, left)])
                        if not n:
                            raise LabError(f"{data}: the file shrank while it was packed; "
                                           "is something writing to it? rerun when it is done")
                        w.write(view[:n])
                        left -= n
                        bar.advance(n)
            w.pad(BLOCK)
        w.write(bytes(2 * BLOCK))       # end-of-archive marker
        w.pad(RECORD)
    return w.sha.hexdigest(), w.size


# --------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------
def load_catalog(path: Path, name: str) -> dict:
    """The catalog at ``path`` (or a new one); it must be for box ``name``."""
    if not path.exists():
        return {"name": name, "description": f"{name}, built by labforge", "versions": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"{path}: unreadable box catalog ({exc}); move it away and rebuild "
                       "the box versions you need") from None
    if not isinstance(data, dict) or not isinstance(data.get("versions", []), list):
        raise LabError(f"{path}: not a Vagrant box catalog; move it away and rebuild")
    if data.get("name") != name:
        raise LabError(f"{path}: is the catalog of box {data.get('name')!r}, not {name!r}; "
                       "pick another --name (box file names replace '/' by '-')")
    data.setdefault("versions", [])
    return data


def _catalog_url(box: Path, base_url: str | None) -> str:
    if base_url:
        return base_url.rstrip("/") + "/" + box.name
    return box.resolve().as_uri()


def catalog_with_version(catalog: dict, version: str, url: str, sha256: str, arch: str) -> dict:
    """A copy of ``catalog`` with ``version`` set to this box (added or replaced)."""
    provider = {"name": "libvirt", "url": url, "checksum_type": "sha256", "checksum": sha256,
                "architecture": arch, "default_architecture": True}
    versions, others = [], []
    for v in catalog.get("versions", []):
        if v.get("version") == version:   # other providers of this version stay
            others = [p for p in v.get("providers", []) if p.get("name") != "libvirt"]
        else:
            versions.append(v)
    versions.append({"version": version, "status": "active", "providers": [provider, *others]})
    versions.sort(key=lambda v: _vkey(str(v.get("version", ""))))
    return {**catalog, "versions": versions}


def _catalog_entry(catalog: dict, version: str) -> dict | None:
    for v in catalog.get("versions", []):
        if v.get("version") == version:
            for p in v.get("providers", []):
                if p.get("name") == "libvirt":
                    return p
    return None


# --------------------------------------------------------------------------
# building a box
# --------------------------------------------------------------------------
def build_box(lab: Lab | None, ws: Workspace, *, image: str | None = None, name: str | None = None,
              version: str | None = None, add: bool = False, force: bool = False,
              base_url: str | None = None, vagrant_env: dict | None = None) -> list[Outcome]:
    """Pack ``image`` as a vagrant-libvirt box, add it to its catalog, and
    optionally ``vagrant box add`` it.

    ``name`` defaults to lab.yaml ``vagrant.box``; ``version`` defaults to
    the version already built from the same inputs, else the catalog's
    latest version with the patch number raised (1.0.0 for a new box).
    """
    start = time.monotonic()
    if name is None:
        name = lab.vagrant.box if lab is not None else "labforge/box"
    check_box_name(name)
    if version is not None:
        check_version(version)
    if image is None and lab is not None:
        image = f"{lab.base_image.distro}-{lab.base_image.release}"
    if base_url is not None and not re.match(r"^(https?|file)://\S+$", base_url):
        raise LabError(f"--base-url {base_url!r}: not an http(s):// or file:// URL")
    img, rec = resolve_image(ws, image or "")
    info = image_info(img)
    cat_path = catalog_path(ws, name)
    catalog = load_catalog(cat_path, name)
    manifest = Manifest(ws.artifacts)

    chain = _backing_chain(img) if "_backing_path" in info else [img]
    arch = _ARCH.get(str(((rec or {}).get("meta") or {}).get("arch", "amd64")), "amd64")
    content = input_digest(FORMAT, name, [_file_digest(ws, p) for p in chain],
                           info.get("virtual-size"), arch)
    if version is None:
        version = _default_version(manifest, catalog, name, content)
    box = box_path(ws, name, version)
    url = _catalog_url(box, base_url)
    digest = input_digest(content, version)
    outcomes: list[Outcome] = []
    step = f"vagrant-box {name} {version}"

    with BuildLock(ws):
        entry = _catalog_entry(load_catalog(cat_path, name), version)
        box_rec = manifest.get(box)
        if (not force and manifest.is_current(box, digest) and entry is not None
                and box_rec is not None and entry.get("checksum") == box_rec["sha256"]):
            if entry.get("url") != url:     # only where it is served from changed
                _write_catalog(manifest, cat_path, name, version, url, box_rec["sha256"], arch)
                outcomes.append(Outcome(step, "built", [cat_path], f"catalog URL now {url}"))
            else:
                outcomes.append(Outcome(step, "up to date", [box, cat_path], str(box.name)))
            built = False
        else:
            remove_stale_parts(box.parent)
            sha, size = _make_box(img, info, box, name, version)
            manifest.record(box, BOX_KIND, digest, sha256=sha,
                            tools={"qemu-img": tool_version("qemu-img")},
                            meta={"name": name, "version": version, "provider": "libvirt",
                                  "architecture": arch,
                                  "virtual_size": box_metadata(info["virtual-size"])["virtual_size"],
                                  "image": _show(ws, img),
                                  "flattened": "_backing_path" in info,
                                  "content_digest": content,
                                  "catalog": manifest.rel(cat_path)})
            _write_catalog(manifest, cat_path, name, version, url, sha, arch)
            what = f"{box.name}, {size / 2**20:.0f} MiB, sha256 {sha[:12]}"
            if "_backing_path" in info:
                what += ", flattened"
            outcomes.append(Outcome(step, "built", [box, cat_path], what,
                                    time.monotonic() - start))
            built = True
    if add:
        outcomes.append(vagrant_box_add(cat_path, name, version, force=built, env=vagrant_env))
    return outcomes


def _write_catalog(manifest: Manifest, cat_path: Path, name: str, version: str, url: str,
                   sha: str, arch: str) -> None:
    catalog = catalog_with_version(load_catalog(cat_path, name), version, url, sha, arch)
    atomic_write(cat_path, json.dumps(catalog, indent=2) + "\n")
    manifest.record(cat_path, CATALOG_KIND, input_digest(catalog),
                    meta={"name": name, "versions": [v["version"] for v in catalog["versions"]]})


def _show(ws: Workspace, path: Path) -> str:
    try:
        return path.relative_to(ws.artifacts.resolve()).as_posix()
    except ValueError:
        try:
            return path.relative_to(ws.artifacts).as_posix()
        except ValueError:
            return str(path)


def _default_version(manifest: Manifest, catalog: dict, name: str, content: str) -> str:
    """The version already built from these inputs, else latest + 0.0.1."""
    for rel, rec in manifest.entries().items():
        meta = rec.get("meta") or {}
        if (rec.get("kind") == BOX_KIND and meta.get("name") == name
                and meta.get("content_digest") == content
                and _catalog_entry(catalog, str(meta.get("version"))) is not None):
            return str(meta["version"])
    known = [str(v.get("version")) for v in catalog.get("versions", [])
             if VERSION_RE.match(str(v.get("version", "")))]
    if not known:
        return "1.0.0"
    major, minor, patch = max(_vkey(v) for v in known)
    return f"{major}.{minor}.{patch + 1}"


def _make_box(img: Path, info: dict, box: Path, name: str, version: str) -> tuple[str, int]:
    """Flatten (if needed) and pack; the box appears only when complete."""
    flat = None
    src = img
    box.parent.mkdir(parents=True, exist_ok=True)
    try:
        if "_backing_path" in info:
            flat = box.parent / f".{box.name}.flat.part"
            log.info("vagrant-box: %s has a backing file; flattening it with qemu-img convert",
                     img.name)
            run(["qemu-img", "convert", "-U", "-O", "qcow2", img, flat],
                what=f"flattening {img.name}")
            src = flat
        meta = json.dumps(box_metadata(info["virtual-size"]), indent=2).encode() + b"\n"
        members: list[tuple[str, bytes | Path]] = [
            ("metadata.json", meta),
            ("Vagrantfile", box_vagrantfile(name, version).encode()),
            ("box.img", src),
        ]
        with atomic_path(box) as tmp:
            sha, size = pack_box(tmp, members, label=f"packing {box.name}")
        return sha, size
    finally:
        if flat is not None and flat.exists():
            flat.unlink()


# --------------------------------------------------------------------------
# vagrant box add
# --------------------------------------------------------------------------
def vagrant_box_add(catalog: Path, name: str, version: str, *, force: bool = False,
                    env: dict | None = None) -> Outcome:
    """``vagrant box add`` the catalog's ``version`` (a no-op when present)."""
    step = f"vagrant box add {name} {version}"
    if shutil.which("vagrant") is None:
        return Outcome(step, "skipped", [], "vagrant is not installed (Debian packages vagrant "
                       "and vagrant-libvirt); add it later with `vagrant box add "
                       f"{catalog.resolve().as_uri()}`")
    if not force and (name, "libvirt", version) in installed_boxes(env):
        return Outcome(step, "up to date", [], "already in `vagrant box list`")
    argv = ["vagrant", "box", "add", "--provider", "libvirt", "--box-version", version,
            catalog.resolve().as_uri()]
    if force:
        argv.insert(3, "--force")
    run(argv, env=env, what="vagrant box add")
    return Outcome(step, "built", [], "added; use it with config.vm.box = " + repr(name))


def installed_boxes(env: dict | None = None) -> set[tuple[str, str, str]]:
    """(name, provider, version) of every box in ``vagrant box list``."""
    proc = run(["vagrant", "box", "list", "--machine-readable"], env=env, what="vagrant box list")
    boxes, cur = set(), {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        parts = line.split(",", 3)
        if len(parts) < 4:
            continue
        key, value = parts[2], parts[3]
        if key == "box-name":
            cur = {"name": value}
        elif key == "box-provider":
            cur["provider"] = value
        elif key == "box-version":
            cur["version"] = value
            boxes.add((cur.get("name", ""), cur.get("provider", ""), value))
    return boxes


# --------------------------------------------------------------------------
# the lab's Vagrantfile and libvirt networks
# --------------------------------------------------------------------------
def _bridge(net: Network) -> str:
    bridge = net.bridge or f"lf-{net.name}"
    if len(bridge) > 15:
        raise LabError(f"lab.yaml: networks.{net.name}: the default bridge name {bridge} is longer "
                       f"than 15 characters; set networks.{net.name}.bridge")
    return bridge


def _gateway(lab: Lab, net: Network) -> IPv4Address:
    if net.gateway is not None:
        return net.gateway
    gw = next(net.cidr.hosts())
    users = [f for f, ip in labnet.addresses_on(lab, net) if ip == gw]
    if users:
        raise LabError(f"lab.yaml: networks.{net.name}.gateway: not given, and the default "
                       f"{gw} is {users[0]}; set networks.{net.name}.gateway")
    return gw


def _host_network(lab: Lab, host: Host) -> Network:
    return lab.network(host.network) if host.network else lab.networks[0]


def _dhcp_range(lab: Lab, net: Network) -> tuple[IPv4Address, IPv4Address]:
    """The upper half of the network, which must hold no static address."""
    cidr: IPv4Network = net.cidr
    start = cidr.network_address + cidr.num_addresses // 2
    end = cidr.broadcast_address - 1
    for field, ip in labnet.addresses_on(lab, net):
        if start <= ip <= end:
            raise LabError(f"lab.yaml: {field}: {ip} is in the DHCP range {start}-{end} "
                           f"of network {net.name}; use an address below {start} or dhcp: false")
    return start, end


def render_network_xml(lab: Lab, net: Network) -> str:
    """libvirt network XML: a bridge whose host side has the gateway address;
    DHCP only when the lab asks for it; NAT or fully isolated."""
    gw = _gateway(lab, net)
    lines = ["<network>",
             f"  <name>{net.name}</name>",
             f"  <bridge name={quoteattr(_bridge(net))} stp=\"on\" delay=\"0\"/>"]
    if net.forward == "nat":
        lines.append('  <forward mode="nat"/>')
    if not net.dhcp and net.forward == "none":
        # static addresses and no way out: no dnsmasq needed at all
        lines.append('  <dns enable="no"/>')
    ip = f'  <ip address="{gw}" netmask="{net.cidr.netmask}"'
    if net.dhcp:
        start, end = _dhcp_range(lab, net)
        # each NIC's lab address, reserved for its MAC
        hosts = [f"      <host mac={quoteattr(mac)} name={quoteattr(name)} ip=\"{addr}\"/>"
                 for mac, name, addr in labnet.dhcp_hosts(lab, net)]
        lines += [ip + ">", "    <dhcp>", f'      <range start="{start}" end="{end}"/>',
                  *hosts, "    </dhcp>", "  </ip>"]
    else:
        lines.append(ip + "/>")
    lines.append("</network>")
    return "<!-- libvirt network of lab " + lab.name + ", made by labforge: define it with\n" \
        f"     virsh net-define {net.name}.xml && virsh net-start {net.name} -->\n" \
        + "\n".join(lines) + "\n"


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
    return seediso.seed_path(lab, ws, host, fmt="iso")


def vfat_only_hosts(lab: Lab, ws: Workspace) -> list[str]:
    """Hosts whose seed exists only as a vfat image, which the Vagrantfile
    cannot attach (see seed_iso_path)."""
    return [h.name for h in lab.hosts
            if not seed_iso_path(lab, ws, h).exists()
            and seediso.seed_path(lab, ws, h, fmt="vfat").exists()]


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
    base = "certs" if seediso.is_secret(lab, ws, host) else "artifacts"
    return f"{base}/seed/{host.name}.iso"


def render_vagrantfile(lab: Lab, ws: Workspace) -> str:
    driver = labnet.vagrant_driver(lab, ws)
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
    ]
    out += [
        "",
        'Vagrant.configure("2") do |config|',
        f"  config.vm.box = {_rb(box)}",
    ]
    if cat.exists():
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
        mgmt = labnet.management_nic(lab, h)
        nets = []
        for nic in h.nics:
            if nic is mgmt:
                continue
            net = lab.network(nic.network)
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


def build_vagrantfile(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Render artifacts/vagrant/Vagrantfile and networks/<name>.xml."""
    start = time.monotonic()
    if not lab.hosts:
        raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to put in a Vagrantfile")
    # render everything first: a problem leaves nothing written
    files: dict[Path, tuple[str, str]] = {}
    vdir = vagrant_dir(ws)
    for net in lab.networks:
        files[vdir / "networks" / f"{net.name}.xml"] = (NETWORK_KIND, render_network_xml(lab, net))
    files[vdir / "Vagrantfile"] = (VAGRANTFILE_KIND, render_vagrantfile(lab, ws))
    manifest = Manifest(ws.artifacts)
    vfat = vfat_only_hosts(lab, ws)
    note = (f"{', '.join(vfat)}: only a vfat seed, which vagrant-libvirt cannot attach; "
            "run `invoke seed-iso` (ISO format) for them" if vfat else "")
    outcomes = []
    with BuildLock(ws):
        for path, (kind, text) in files.items():
            digest = input_digest(FORMAT, kind, text)
            rel = manifest.rel(path)
            detail = note if kind == VAGRANTFILE_KIND else ""
            if not force and manifest.is_current(path, digest):
                outcomes.append(Outcome(f"vagrantfile {rel}", "up to date", [path], detail))
                continue
            atomic_write(path, text)
            manifest.record(path, kind, digest, meta={"lab": lab.name})
            outcomes.append(Outcome(f"vagrantfile {rel}", "built", [path], detail,
                                    seconds=time.monotonic() - start))
        # networks no longer in the lab: their XML would only mislead
        wanted = {manifest.rel(p) for p in files}
        for rel, rec in list(manifest.entries().items()):
            if rec.get("kind") == NETWORK_KIND and rel not in wanted:
                (ws.artifacts / rel).unlink(missing_ok=True)
                manifest.remove(rel)
                outcomes.append(Outcome(f"vagrantfile {rel}", "built", [], "removed: not in the lab"))
    return outcomes


def build_lab_vagrant(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """`invoke all`'s step: the box of the lab's base image (when built), the
    Vagrantfile and the network XML."""
    outcomes: list[Outcome] = []
    base = f"{lab.base_image.distro}-{lab.base_image.release}"
    try:
        Manifest(ws.artifacts).find(base, kinds=("base-image",))
        have_base = True
    except LabError:
        have_base = False
    if have_base:
        outcomes += build_box(lab, ws, image=base, name=lab.vagrant.box, force=force)
    else:
        outcomes.append(Outcome(f"vagrant-box {lab.vagrant.box}", "skipped", [],
                                f"no base image {base} in the manifest; run the base image build first"))
    outcomes += build_vagrantfile(lab, ws, force=force)
    return outcomes
