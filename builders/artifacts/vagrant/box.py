"""A vagrant-libvirt box from a built qcow2 image
(``artifacts/boxes/<org>-<name>-<version>.box``).

A plain POSIX tar of ``metadata.json``, ``Vagrantfile`` and ``box.img``,
the layout vagrant-libvirt expects.  ``box.img`` is the qcow2 as it is, or
flattened with ``qemu-img convert`` when it has a backing file.  The tar is
not gzipped: a qcow2 already stores only allocated clusters (and
diskimage-builder compresses them), so a gzip pass costs minutes of CPU at
packing time and again at every ``vagrant box add`` for little gain.  The
tar is streamed in constant memory and hashed (sha256) while it is written,
so the checksum costs no second read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from builders.tools import qemu_img
from builders.tools.qemu_img import check as qemu_check
from builders.core.console import log, progress
from builders.core.errors import LabError
from builders.core.manifest import Manifest
from builders.core.workspace import Workspace

IMAGE_KINDS = ("base-image", "amphora")
BOX_KIND = "vagrant-box"
QCOW2_MAGIC = b"QFI\xfb"
GIB = 1024 ** 3
BUF = 4 << 20                 # 4 MiB copy buffer: constant memory, few syscalls
BLOCK = tarfile.BLOCKSIZE     # 512
RECORD = tarfile.RECORDSIZE   # 10240: tar files end on a record boundary
DEFAULT_MTIME = 946684800    # 2000-01-01: tar member mtime when SOURCE_DATE_EPOCH is unset


def tar_mtime() -> int:
    """The box members' mtime: SOURCE_DATE_EPOCH when set, else a fixed date,
    so the same inputs give the same box (and checksum)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return DEFAULT_MTIME
    if not raw.isdigit() or not 0 < int(raw) < 8 ** 11:      # what a ustar header holds
        raise LabError(f"SOURCE_DATE_EPOCH: {raw!r} is not a number of seconds since 1970; "
                       "unset it or give e.g. $(git log -1 --format=%ct)")
    return int(raw)

# vagrant-libvirt names for what `uname -m`-style image metadata may say
ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


# --------------------------------------------------------------------------
# the image to pack
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
    info = qemu_img.info(path)
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


def backing_chain(path: Path) -> list[Path]:
    chain = qemu_img.backing_chain(path)
    return [Path(i["filename"]) for i in chain if i.get("filename")]


def file_digest(ws: Workspace, path: Path) -> str:
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


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = mtime
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
    mtime = tar_mtime()
    total = sum(len(d) if isinstance(d, bytes) else d.stat().st_size for _, d in members)
    buf = bytearray(BUF)
    view = memoryview(buf)
    with open(out, "wb") as fh, progress(label, total) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        w = _HashingWriter(fh, pool)
        for name, data in members:
            if isinstance(data, bytes):
                w.write(_tar_header(name, len(data), mtime))
                w.write(data)
                bar.advance(len(data))
            else:
                with open(data, "rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    w.write(_tar_header(name, size, mtime))
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



def make_box(img: Path, info: dict, box: Path, out: Path, name: str,
             version: str) -> tuple[str, int]:
    """Flatten ``img`` (if it has a backing file) and pack the box for
    ``box`` into the file ``out`` (the stage's temporary file); return the
    tar's (sha256, size)."""
    flat = None
    src = img
    box.parent.mkdir(parents=True, exist_ok=True)
    try:
        if "_backing_path" in info:
            flat = box.parent / f".{box.name}.flat.part"
            log.info("vagrant-box: %s has a backing file; flattening it with qemu-img convert",
                     img.name)
            qemu_img.convert(img, flat, what=f"flattening {img.name}")
            src = flat
        meta = json.dumps(box_metadata(info["virtual-size"]), indent=2).encode() + b"\n"
        members: list[tuple[str, bytes | Path]] = [
            ("metadata.json", meta),
            ("Vagrantfile", box_vagrantfile(name, version).encode()),
            ("box.img", src),
        ]
        return pack_box(out, members, label=f"packing {box.name}")
    finally:
        if flat is not None and flat.exists():
            flat.unlink()
