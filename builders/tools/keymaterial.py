"""What may go on a public seed: key material and where files come from.

A seed under artifacts/ is published; one under certs/seed/ is not.  A file
a seed carries makes it secret when it is key material (a PEM or OpenSSH
private key, a PKCS#12 or JKS store), when it comes from certs/, or when it
is a hard link (another name of it may be a key in another workspace: its
content says nothing about that).  A write_files source must lie inside the
lab file's directory or certs/, symlinks resolved: ``../../etc/shadow`` or
an absolute path elsewhere is refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from builders.core.errors import LabError

_PEM_PRIVATE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_MARKERS = (
    (b"PuTTY-User-Key-File", "a PuTTY private key"),
    (b"\xfe\xed\xfe\xed", "a JKS keystore"),
    (b"\xce\xce\xce\xce", "a JCEKS keystore"),
)
# PKCS#12: pkcs8ShroudedKeyBag / keyBag OIDs (1.2.840.113549.1.12.10.1.2 / .1)
_P12_BAGS = (bytes.fromhex("060b2a864886f70d010c0a0102"), bytes.fromhex("060b2a864886f70d010c0a0101"))
# pkcs7-data OID: the outer content type of every PKCS#12 file
_P7_DATA = bytes.fromhex("06092a864886f70d010701")


def key_material(data: bytes) -> str | None:
    """What kind of key material ``data`` holds, or None.  Also looks inside
    base64 (a key pasted as ``!!binary`` or b64 content)."""
    if _PEM_PRIVATE.search(data):
        return "a private key"
    for marker, what in _MARKERS:
        if data.startswith(marker) or (marker.startswith(b"PuTTY") and marker in data):
            return what
    if data[:1] == b"\x30" and (_P7_DATA in data[:64] or any(b in data for b in _P12_BAGS)):
        return "a PKCS#12 store"
    if any(b in data for b in _P12_BAGS):
        return "a PKCS#12 key bag"
    for m in re.finditer(rb"[A-Za-z0-9+/]{80,}={0,2}", data):
        blob = m.group(0)[: len(m.group(0)) // 4 * 4]
        try:
            inner = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            continue
        if _PEM_PRIVATE.search(inner) or inner.startswith((b"\xfe\xed\xfe\xed", b"\xce\xce\xce\xce")) \
                or any(b in inner for b in _P12_BAGS):
            return "base64-encoded key material"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def check_source(value: str, path: Path, lab_dir: Path, certs: Path, where: str) -> Path:
    """``path`` (a write_files source) resolved; a LabError when it lies
    outside the lab file's directory and certs/."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        raise LabError(f"{where}: {value}: a symlink loop; name the file itself") from None
    if _inside(resolved, lab_dir) or _inside(resolved, certs):
        return resolved
    shown = f"{value} (that is {resolved})" if str(resolved) != value else value
    raise LabError(f"{where}: {shown} is outside the lab file's directory {lab_dir} and certs/; "
                   "copy the file next to the lab file (a seed must not pick up files from "
                   "elsewhere on this machine)")


def secret_reason(path: Path, data: bytes | None, certs: Path) -> str | None:
    """Why a file a seed carries makes the seed secret, or None."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return None
    if _inside(resolved, certs):
        return "it comes from certs/"
    try:
        st = os.stat(resolved)
    except OSError:
        return None
    if st.st_nlink > 1:
        return f"it is a hard link ({st.st_nlink} names; another may be a key)"
    if data is not None:
        what = key_material(data)
        if what:
            return f"it is {what}"
    return None
