"""Scan published outputs (artifacts/) for key material and a lab's secrets.

Looks at the bytes of every file (an ISO 9660 or FAT seed stores its files
uncompressed), and inside every long base64 run (write_files content is
base64 in user-data).  Finds PEM and OpenSSH private keys, PKCS#12 key bags,
JKS keystores and any of the given secret strings.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

PRIVATE_MARKERS = {
    b"PRIVATE KEY-----": "a PEM/OpenSSH private key",
    # PKCS#12 pkcs8ShroudedKeyBag / keyBag OIDs (1.2.840.113549.1.12.10.1.2 / .1)
    bytes.fromhex("060b2a864886f70d010c0a0102"): "a PKCS#12 shrouded key bag",
    bytes.fromhex("060b2a864886f70d010c0a0101"): "a PKCS#12 key bag",
    b"\xfe\xed\xfe\xed": "a JKS keystore",
}
_B64 = re.compile(rb"[A-Za-z0-9+/\r\n]{64,}={0,2}")
LIMIT = 256 << 20          # disk images larger than this are not scanned


def secrets_of(certs: Path) -> list[str]:
    """The secret strings a workspace's certs/ holds (store password,
    Octavia passphrases, heartbeat key)."""
    out = []
    for name in ("kafka/store.password", "octavia/ca_private_key_passphrase",
                 "octavia/server_certs_key_passphrase", "octavia/heartbeat_key"):
        p = certs / name
        if p.is_file():
            text = p.read_text().strip()
            if len(text) >= 6:
                out.append(text)
    return out


def _scan_bytes(data: bytes, secrets: list[bytes], depth: int = 0) -> list[str]:
    found = [what for marker, what in PRIVATE_MARKERS.items()
             if marker in data and not (marker == b"\xfe\xed\xfe\xed" and depth == 0
                                        and not data.startswith(marker))]
    found += ["a lab secret" for s in secrets if s in data]
    if depth == 0:
        for m in _B64.finditer(data):
            blob = re.sub(rb"\s", b"", m.group(0))
            blob = blob[: len(blob) - len(blob) % 4]
            try:
                decoded = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                continue
            found += [f"{f} (base64)" for f in _scan_bytes(decoded, secrets, 1)]
    return found


def scan(root: Path, secrets: list[str]) -> list[str]:
    """'path: what' for every published file holding key material or a secret."""
    problems = []
    raw_secrets = [s.encode() for s in secrets]
    if not root.is_dir():
        return problems
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.is_symlink() or p.stat().st_size > LIMIT:
            continue
        for what in dict.fromkeys(_scan_bytes(p.read_bytes(), raw_secrets)):
            problems.append(f"{p.relative_to(root)}: {what}")
    return problems
