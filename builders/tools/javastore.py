"""Java KeyStore (JKS) files, written directly.

A JKS is a short binary format (``sun.security.provider.JavaKeyStore``):

    magic 0xFEEDFEED, version 2, entry count            (big-endian u32 each)
    per entry: tag (1 private key, 2 trusted certificate), alias (Java's
               writeUTF: u16 length + bytes), creation time (u64, ms), then
      tag 1:   the protected key (u32 length + bytes), the chain length (u32),
               and per certificate: its type "X.509" (writeUTF), u32 length, DER
      tag 2:   "X.509" (writeUTF), u32 length, DER
    SHA-1(password as UTF-16BE + b"Mighty Aphrodite" + everything above)

A private key is protected the way ``sun.security.provider.KeyProtector``
does it: a 20-byte random salt, the PKCS#8 key XORed with the SHA-1 chain
``d1 = SHA-1(pw + salt), d2 = SHA-1(pw + d1), ...``, and SHA-1(pw + key) to
check it; salt + XORed key + check go into an EncryptedPrivateKeyInfo under
Sun's OID 1.3.6.1.4.1.42.2.17.1.1.  keytool and the JVM's KeyStore read
what :func:`keystore` and :func:`truststore` write, and :func:`read` opens
what keytool writes (both shown by the tests).  Doing it here instead of
with pyjks saves a fresh ``invoke certs`` about a fifth of its time (pyjks
pulls in pycryptodome and pyasn1) and a dependency that needs a C
extension to install.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Sequence

MAGIC = 0xFEEDFEED
VERSION = 2
_PRIVATE, _TRUSTED = 1, 2
# 1.3.6.1.4.1.42.2.17.1.1 (Sun's JKS key protector), DER with a NULL parameter
_PROTECTOR_ALG = bytes.fromhex("300e060a2b060104012a02110101" "0500")


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _utf(text: str) -> bytes:
    """Java's DataOutput.writeUTF for the ASCII names used here."""
    data = text.encode("ascii")
    return struct.pack(">H", len(data)) + data


def _password(password: str) -> bytes:
    return password.encode("utf-16-be")


def protect_key(pkcs8_der: bytes, password: str) -> bytes:
    """The EncryptedPrivateKeyInfo keytool expects for a JKS private key entry."""
    pw = _password(password)
    salt = os.urandom(20)
    stream, digest = bytearray(), salt
    while len(stream) < len(pkcs8_der):
        digest = hashlib.sha1(pw + digest).digest()
        stream += digest
    hidden = bytes(a ^ b for a, b in zip(pkcs8_der, stream))
    check = hashlib.sha1(pw + pkcs8_der).digest()
    return _der(0x30, _PROTECTOR_ALG + _der(0x04, salt + hidden + check))


def _store(entries: Sequence[bytes], password: str) -> bytes:
    body = struct.pack(">III", MAGIC, VERSION, len(entries)) + b"".join(entries)
    return body + hashlib.sha1(_password(password) + b"Mighty Aphrodite" + body).digest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def keystore(alias: str, pkcs8_der: bytes, chain_der: Sequence[bytes], password: str) -> bytes:
    """A JKS with one private key entry (``alias``, lower-cased as Java does)
    holding ``chain_der`` (the key's certificate first); the key password is
    the store password, as Kafka expects by default."""
    key = protect_key(pkcs8_der, password)
    entry = (struct.pack(">I", _PRIVATE) + _utf(alias.lower()) + struct.pack(">Q", _now_ms())
             + struct.pack(">I", len(key)) + key + struct.pack(">I", len(chain_der))
             + b"".join(_utf("X.509") + struct.pack(">I", len(c)) + c for c in chain_der))
    return _store([entry], password)


def truststore(entries: Sequence[tuple[str, bytes]], password: str) -> bytes:
    """A JKS of trusted certificate entries (alias, DER)."""
    return _store([struct.pack(">I", _TRUSTED) + _utf(alias.lower()) + struct.pack(">Q", _now_ms())
                   + _utf("X.509") + struct.pack(">I", len(der)) + der
                   for alias, der in entries], password)


def password_opens(data: bytes, password: str) -> bool:
    """Whether ``password`` is the store password of a JKS (keytool checks
    exactly this trailer), without parsing the entries."""
    if len(data) < 32 or struct.unpack(">I", data[:4])[0] != MAGIC:
        return False
    return hashlib.sha1(_password(password) + b"Mighty Aphrodite" + data[:-20]).digest() == data[-20:]


@dataclass
class Store:
    """A JKS as read: private key entries (alias -> PKCS#8 DER and the chain
    as DER) and trusted certificates (alias -> DER)."""
    keys: dict[str, tuple[bytes, list[bytes]]] = field(default_factory=dict)
    certs: dict[str, bytes] = field(default_factory=dict)


def unprotect_key(info: bytes, password: str) -> bytes:
    """The PKCS#8 key inside a JKS EncryptedPrivateKeyInfo; ValueError when
    ``password`` is not the one it was protected with."""
    body = _der_body(info, 0x30)
    alg = _der_body(body, 0x30)                     # AlgorithmIdentifier
    if not alg.startswith(_PROTECTOR_ALG[2:14]):    # the OID, NULL parameter or none
        raise ValueError("the key is not protected with the JKS key protector")
    blob = _der_body(body[2 + len(alg):], 0x04)
    if len(blob) < 40:
        raise ValueError("protected key too short")
    pw = _password(password)
    salt, hidden, check = blob[:20], blob[20:-20], blob[-20:]
    stream, digest = bytearray(), salt
    while len(stream) < len(hidden):
        digest = hashlib.sha1(pw + digest).digest()
        stream += digest
    plain = bytes(a ^ b for a, b in zip(hidden, stream))
    if hashlib.sha1(pw + plain).digest() != check:
        raise ValueError("the key does not open with this password")
    return plain


def read(data: bytes, password: str) -> Store:
    """Parse a JKS, check its trailer against ``password`` and open its keys
    with the same password (Kafka's default); ValueError on any mismatch."""
    if not password_opens(data, password):
        raise ValueError("not a JKS, or the store password does not open it")
    store, pos = Store(), 12
    try:
        _magic, version, count = struct.unpack_from(">III", data, 0)
        if version not in (1, 2):
            raise ValueError(f"JKS version {version}")

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(data) - 20:
                raise ValueError("truncated")
            out = data[pos:pos + n]
            pos += n
            return out

        def utf() -> str:
            return take(struct.unpack(">H", take(2))[0]).decode("utf-8", "replace")

        def cert() -> bytes:
            if version == 2:
                utf()                                           # "X.509"
            return take(struct.unpack(">I", take(4))[0])

        for _ in range(count):
            tag = struct.unpack(">I", take(4))[0]
            alias = utf()
            take(8)                                             # creation time
            if tag == _PRIVATE:
                info = take(struct.unpack(">I", take(4))[0])
                chain = [cert() for _ in range(struct.unpack(">I", take(4))[0])]
                store.keys[alias] = (unprotect_key(info, password), chain)
            elif tag == _TRUSTED:
                store.certs[alias] = cert()
            else:
                raise ValueError(f"entry type {tag}")
    except struct.error:
        raise ValueError("truncated") from None
    return store


def _der_body(data: bytes, tag: int) -> bytes:
    if len(data) < 2 or data[0] != tag:
        raise ValueError("unexpected DER")
    n, i = data[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, i = int.from_bytes(data[2:2 + size], "big"), 2 + size
    if i + n > len(data):
        raise ValueError("truncated DER")
    return data[i:i + n]
