"""PKI primitives: keys, CAs, leaf certificates, PEM/PKCS12/JKS stores, SSH keys.

Pure functions over cryptography objects (JKS files: :mod:`javastore`);
nothing here touches the workspace.  The sets of ``builders.artifacts.certs`` (kafka, octavia,
ssh) decide *what* to issue; the package's ``build_certs`` decides *when*
and writes the files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import secrets
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm  # noqa: F401 (re-exported)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builders.core.errors import LabError
from builders.tools import javastore

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------
def new_password(length: int = 32, alphabet: str = string.ascii_letters + string.digits) -> str:
    """A random password from ``alphabet`` (letters and digits by default:
    safe in .properties files, shell snippets and Octavia's config)."""
    return "".join(secrets.choice(alphabet) for _ in range(length))


def new_octavia_passphrase() -> str:
    """32 characters matching Octavia's ``^[A-Za-z0-9_=-]{32}$``."""
    return new_password(32, string.ascii_letters + string.digits + "_=-")


# --------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------
def new_key(key_type: str = "rsa", rsa_bits: int = 2048) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


class KeySupply:
    """``n`` new keys, generated on every core while the caller goes on.

    RSA key generation is almost all of a fresh certificate set's time, and
    OpenSSL's generator runs without the GIL, so threads make keys in
    parallel (a process pool measured slower: it pays for the start-up and
    for pickling keys; benchmarks/bench_certs.py compares the three ways).
    ECDSA keys take a millisecond and are made on :meth:`take`.  A supply
    left early (an error while planning) cancels the keys not yet started
    when closed; leaving its ``with`` block closes it.
    """

    def __init__(self, n: int, key_type: str = "rsa", rsa_bits: int = 2048):
        self.key_type, self.rsa_bits = key_type, rsa_bits
        self._pool = None
        self._ahead: list = []
        if n > 1 and key_type == "rsa":
            self._pool = ThreadPoolExecutor(min(n, os.cpu_count() or 1),
                                            thread_name_prefix="keygen")
            self._ahead = [self._pool.submit(new_key, key_type, rsa_bits) for _ in range(n)]

    def take(self) -> PrivateKey:
        """The next key (waiting for it if it is still being made)."""
        if self._ahead:
            return self._ahead.pop(0).result()
        return new_key(self.key_type, self.rsa_bits)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._ahead = None, []

    def __enter__(self) -> "KeySupply":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def key_pem(key, passphrase: str | None = None) -> bytes:
    """PKCS#8 PEM, encrypted (PBES2/AES-256) when a passphrase is given."""
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, enc)


def load_key(data: bytes, passphrase: str | None = None):
    """Load a PEM private key; raise ValueError/TypeError on any problem.

    RSA consistency checks are skipped (they cost ~70 ms per key): callers
    compare the key with its certificate instead, which catches a corrupted
    or swapped key just as well for our purposes.
    """
    return serialization.load_pem_private_key(
        data, passphrase.encode() if passphrase else None,
        unsafe_skip_rsa_key_validation=True)


def same_public_key(key, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(DER, spki) == cert.public_key().public_bytes(DER, spki)


def key_type_of(key) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ecdsa-{key.curve.name}"
    return type(key).__name__


# --------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------
def _now() -> _dt.datetime:
    # a minute back: a peer whose clock is slightly behind still accepts it
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0) - _dt.timedelta(minutes=1)


def name(cn: str, org: str | None = None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def new_ca(key, subject: x509.Name, days: int) -> x509.Certificate:
    """A self-signed root CA (pathlen 0: it signs leaves only)."""
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(ski, critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                              critical=False))
    return builder.sign(key, hashes.SHA256())


def san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses (strings) as GeneralNames, in order, no duplicates."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            continue
        seen.add(n)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def issue(ca_cert: x509.Certificate, ca_key, key, subject: x509.Name, days: int,
          sans: Sequence[str] = (), eku: Sequence[x509.ObjectIdentifier] = (SERVER_AUTH,)
          ) -> x509.Certificate:
    """A leaf certificate for ``key`` signed by the CA."""
    now = _now()
    not_after = min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    is_rsa = isinstance(key.public_key(), rsa.RSAPublicKey)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                   data_encipherment=False, key_agreement=not is_rsa, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_cert.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_entries(sans)),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)


def load_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def sans_of(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for gn in ext:
        if isinstance(gn, x509.DNSName):
            out.append(f"DNS:{gn.value}")
        elif isinstance(gn, x509.IPAddress):
            out.append(f"IP:{gn.value}")
        else:
            out.append(str(gn.value))
    return out


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# --------------------------------------------------------------------------
# stores
# --------------------------------------------------------------------------
def _p12_encryption(password: str):
    # AES-256-CBC + PBKDF2-HMAC-SHA256, HMAC-SHA256 MAC: read by Java >= 11.0.12/17,
    # OpenSSL 3 and cryptography; nothing legacy (no RC2/3DES) is needed.
    return (serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(10000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password.encode()))


def p12_keystore(alias: str, key, cert: x509.Certificate, chain: Sequence[x509.Certificate],
                 password: str) -> bytes:
    """PKCS#12 with one private key entry (alias) holding ``cert`` + ``chain``."""
    return pkcs12.serialize_key_and_certificates(
        alias.encode(), key, cert, list(chain), _p12_encryption(password))


def p12_truststore(entries: Sequence[tuple[str, x509.Certificate]], password: str) -> bytes:
    """PKCS#12 truststore Java recognises: each bag carries Java's
    trusted-key-usage attribute (OID 2.16.840.1.113894.746875.1.1), which
    ``serialize_java_truststore`` writes; without it keytool lists 0 entries."""
    certs = [pkcs12.PKCS12Certificate(c, alias.encode()) for alias, c in entries]
    return pkcs12.serialize_java_truststore(certs, _p12_encryption(password))


def jks_keystore(alias: str, key, cert: x509.Certificate, chain: Sequence[x509.Certificate],
                 password: str) -> bytes:
    der_key = key.private_bytes(DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return javastore.keystore(alias, der_key, [c.public_bytes(DER) for c in (cert, *chain)],
                              password)


def jks_truststore(entries: Sequence[tuple[str, x509.Certificate]], password: str) -> bytes:
    return javastore.truststore([(alias, c.public_bytes(DER)) for alias, c in entries], password)


def open_p12(data: bytes, password: str) -> pkcs12.PKCS12KeyAndCertificates:
    """Load a PKCS#12; ValueError when the password does not open it."""
    return pkcs12.load_pkcs12(data, password.encode())


def open_jks(data: bytes, password: str) -> javastore.Store:
    """Load a JKS and open its keys; raise ValueError on a wrong password."""
    return javastore.read(data, password)


def jks_password_opens(data: bytes, password: str) -> bool:
    """Whether ``password`` is the store password of a JKS, without loading it."""
    return javastore.password_opens(data, password)


# --------------------------------------------------------------------------
# SSH
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SshKey:
    private: bytes   # OpenSSH private key format
    public: bytes    # "ssh-ed25519 AAAA... comment\n"


def new_ssh_key(comment: str) -> SshKey:
    key = ed25519.Ed25519PrivateKey.generate()
    return ssh_key_files(key, comment)


def ssh_key_files(key, comment: str) -> SshKey:
    priv = key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    return SshKey(priv, pub + b" " + comment.encode() + b"\n")


def load_ssh_key(data: bytes):
    return serialization.load_ssh_private_key(data, None)


def ssh_fingerprint(public_line: bytes) -> str:
    """``SHA256:...`` as ssh-keygen -lf prints it."""
    import base64
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_password(pw: str, where: str) -> str:
    """A store password every consumer reads the same: keytool, OpenSSL,
    Python and Java's .properties (ISO-8859-1, backslash escapes) alike."""
    if pw.startswith("\ufeff"):
        raise LabError(f"{where}: the password file starts with a byte-order mark (an editor "
                       "saved it as 'UTF-8 with BOM'); save it as plain text without one")
    bad = next((c for c in pw if not (" " <= c <= "~") and c not in "\r\n"), None)
    if bad is not None:
        raise LabError(f"{where}: the store password holds {bad!r} (U+{ord(bad):04X}); use "
                       "printable ASCII only (Java reads .properties as ISO-8859-1, so other "
                       "characters would not open the stores there)")
    if len(pw) < 6:
        raise LabError(f"{where}: the store password must have at least 6 characters "
                       "(Java keystores refuse shorter ones)")
    if any(c in pw for c in "\n\r\\") or pw != pw.strip():
        raise LabError(f"{where}: the store password must be one line without backslashes "
                       "or surrounding blanks (it goes into .properties files)")
    return pw


# --------------------------------------------------------------------------
# certs-check: keys and stores as their consumers load them
# --------------------------------------------------------------------------
def key_problem(cert: x509.Certificate, data: bytes, passphrase: str | None = None) -> str | None:
    """Why the PEM private key ``data`` is not ``cert``'s key, or None."""
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError:
        return "its key needs a passphrase that is missing or not needed"
    except (ValueError, UnsupportedAlgorithm):
        return "its key does not load (not a PEM private key, or damaged)"
    if not same_public_key(key, cert):
        return "its key does not belong to it"
    return None


def store_problem(data: bytes, kind: str, password: str, cert: x509.Certificate | None = None
                  ) -> str | None:
    """Why a keystore (``kind`` "p12" or "jks") does not open with
    ``password`` or does not hold ``cert``'s key (None: it is fine).  For a
    truststore pass ``cert`` None: it must open and hold a certificate."""
    if kind == "p12":
        try:
            store = open_p12(data, password)
        except (ValueError, TypeError):
            return "does not open with the stored password"
        if cert is None:
            return None if (store.cert or store.additional_certs) else "holds no certificate"
        if store.key is None or not same_public_key(store.key, cert):
            return "does not hold the key of its certificate"
        return None
    if not jks_password_opens(data, password):
        return "does not open with the stored password"
    try:
        store = open_jks(data, password)
    except ValueError:
        return "its key entry does not open with the stored password"
    if cert is None:
        return None if store.certs else "holds no trusted certificate"
    for pkcs8, _chain in store.keys.values():
        key = serialization.load_der_private_key(pkcs8, None)
        if same_public_key(key, cert):
            return None
    return "does not hold the key of its certificate"
