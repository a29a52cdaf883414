"""qemu-img: every disk image operation labforge performs, in one place.

Reading (``info``, ``backing_chain``, ``written_bytes``), checking
(``check``, ``check_chain``), creating (``create_overlay``) and writing
(``convert``, ``compress_qcow2``) images all go through here, so each
qemu-img command line and the way its failures become one user line is
written once.  Reads pass ``-U`` (no lock): they work while a VM runs the
image.  Every command runs through :mod:`builders.core.extcmd`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from builders.core import extcmd
from builders.core.errors import LabError


def info(path: Path) -> dict:
    """``qemu-img info --output=json`` of an image."""
    proc = extcmd.run(["qemu-img", "info", "-U", "--output=json", path],
                      what=f"reading image {Path(path).name}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"{path}: qemu-img info printed no JSON; is it an image?") from None


def backing_chain(path: Path) -> list[dict]:
    """``qemu-img info --backing-chain``: the image first, then its backing files."""
    proc = extcmd.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                      what=f"reading image {Path(path).name}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"{path}: qemu-img info printed no JSON; is it an image?") from None


def virtual_size(path: Path) -> int | None:
    """Virtual disk size in bytes, None when qemu-img is not installed."""
    if not shutil.which("qemu-img"):
        return None
    return info(path).get("virtual-size")


def detect_format(path: Path) -> str:
    """The image format as qemu-img names it (qcow2, raw, vmdk, vpc, vhdx, ...),
    ``iso`` for an ISO 9660 file (qemu-img calls it raw); from magic bytes
    when qemu-img is not installed."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        fh.seek(0x8001)
        iso = fh.read(5) == b"CD001"
    if iso:
        return "iso"
    if shutil.which("qemu-img"):
        return info(path).get("format", "raw")
    for magic, fmt in ((b"QFI\xfb", "qcow2"), (b"KDMV", "vmdk"), (b"vhdxfile", "vhdx")):
        if head.startswith(magic):
            return fmt
    return "raw"


def check(path: Path, what: str) -> None:
    """``qemu-img check`` of a qcow2 (reads only its tables, so it is quick):
    a truncated or damaged image is a LabError ending in ``what`` (what to
    do about it).  Leaked clusters (exit status 3) are harmless."""
    chk = extcmd.run(["qemu-img", "check", "-U", path], check=False,
                     what=f"checking image {Path(path).name}")
    if chk.returncode in (0, 3):
        return
    out = chk.stdout + chk.stderr
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    found = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "corrupt" in ln.lower()]
    raise LabError(f"{path}: `qemu-img check` finds the image damaged "
                   f"({found[0].rstrip('.') if found else f'exit status {chk.returncode}'}); {what}")


def written_bytes(path: Path) -> int:
    """Bytes of guest data stored in an overlay itself (not in its backing chain)."""
    proc = extcmd.run(["qemu-img", "map", "-U", "--output=json", path],
                      what=f"reading {Path(path).name}")
    total = 0
    for ext in json.loads(proc.stdout):
        if ext.get("depth") == 0 and ext.get("data"):
            total += int(ext["length"])
    return total


def create_overlay(path: Path, backing: Path | str, *, backing_format: str = "qcow2",
                   size: str | None = None, cwd: Path | None = None,
                   what: str | None = None) -> Path:
    """A qcow2 at ``path`` backed by ``backing`` with an explicit backing
    format (qemu never probes it); ``backing`` may be relative to ``cwd``."""
    extcmd.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format,
                path, *([size] if size else [])], cwd=cwd,
               what=what or f"creating {Path(path).name}")
    return Path(path)


def check_chain(overlay: Path, base: Path, size: int) -> list[str]:
    """Confirm with ``qemu-img info --backing-chain`` that ``overlay`` is a
    qcow2 of ``size`` bytes backed by the qcow2 ``base``; return the chain."""
    chain = backing_chain(overlay)
    top = chain[0]
    problems = []
    if top.get("format") != "qcow2":
        problems.append(f"format {top.get('format')}")
    if int(top.get("virtual-size", 0)) != size:
        problems.append(f"virtual size {top.get('virtual-size')} != {size}")
    if top.get("backing-filename-format") != "qcow2":
        problems.append("no explicit backing format")
    if len(chain) < 2 or Path(chain[1]["filename"]).resolve() != base.resolve():
        problems.append(f"backing file is {top.get('full-backing-filename')}, not {base}")
    if problems:
        raise LabError(f"{overlay}: qemu-img reports a wrong chain: {'; '.join(problems)}")
    return [Path(c["filename"]).name for c in chain]


def convert(src: Path, dst: Path, *, out_format: str = "qcow2", what: str | None = None) -> Path:
    """``qemu-img convert``: ``src`` (and its backing chain) as one standalone image."""
    extcmd.run(["qemu-img", "convert", "-U", "-O", out_format, src, dst],
               what=what or f"converting {Path(src).name}")
    return Path(dst)


def compress_qcow2(src: Path, dst: Path, *, what: str) -> Path:
    """Write ``src`` (any qcow2/raw image) to ``dst`` as a zlib-compressed qcow2.

    The same format DIB's ``qemu-img convert -c`` writes (readable by every
    QEMU), but with out-of-order writes and 16 requests in flight, so the
    compression runs on every core instead of one.
    """
    extcmd.run(["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", src, dst],
               what=f"{what}: qemu-img convert -c")
    return Path(dst)
