"""certs/kafka/: the Kafka lab's CA, broker and client identities, stores and properties.

Files (``<id>`` is a broker's host name or the client name):

    ca.crt, ca.key                       the CA (key 0600)
    <id>.crt, <id>.key, <id>-chain.pem   PEM: cert, key, cert + CA
    <id>.keystore.p12, <id>.keystore.jks key + chain (2 certificates), alias <id>
    truststore.p12, truststore.jks       the CA as a trusted certificate entry (alias ca)
    store.password                       store and key password (0600)
    server-<host>.properties             the broker's server.properties (listeners, ZooKeeper or
                                         KRaft, TLS), installed by its seed
    client-ssl.properties                the same for clients (kafka-console-*, ...)
    client-bundle.pem                    client cert + CA + client key, for Python clients
"""

from __future__ import annotations

from pathlib import Path

from builders.artifacts import kafka_node
from builders.tools import pki
from builders.artifacts.certs.common import (PUBLIC, SECRET, Plan, ca_due, cert_record, exists,
                                             leaf_due, read_bytes, time_left)
from builders.core.errors import LabError
from builders.core.fsutil import read_regular
from builders.core.lab import Host, Lab
from builders.core.manifest import input_digest
from builders.core.workspace import Workspace

CA_ALIAS = "ca"
LEAF_FILES = ("{n}.crt", "{n}.key", "{n}-chain.pem", "{n}.keystore.p12", "{n}.keystore.jks")


def _dir(ws: Workspace) -> Path:
    return ws.certs / "kafka"


def identities(lab: Lab) -> list[dict]:
    """What each identity's certificate says: name, kind, CN, SANs, EKUs."""
    out = []
    for h in lab.brokers():
        out.append({"name": h.name, "kind": "broker", "cn": lab.fqdn(h),
                    "sans": broker_sans(lab, h), "eku": ["serverAuth", "clientAuth"]})
    out.append({"name": lab.kafka.client, "kind": "client", "cn": lab.kafka.client,
                "sans": [], "eku": ["clientAuth"]})
    return out


def broker_sans(lab: Lab, h: Host) -> list[str]:
    """Every name and address a client uses for the broker: its name, FQDN and
    the address of each NIC (the TLS listener's network for Kafka clients and
    ZooKeeper's client port; the internal one, which ZooKeeper's quorum
    checks a peer's certificate against), then extra_sans."""
    sans = [h.name]
    if lab.domain:
        sans.append(lab.fqdn(h))
    for nic in h.nics or ():
        if str(nic.ip) not in sans:
            sans.append(str(nic.ip))
    if str(h.ip) not in sans:
        sans.append(str(h.ip))
    sans += [s for s in h.extra_sans if s not in sans]
    return sans


_EKU = {"serverAuth": pki.SERVER_AUTH, "clientAuth": pki.CLIENT_AUTH}


def _password(lab: Lab, d: Path) -> tuple[str, str, bool]:
    """(password, where it comes from, generated now)."""
    if lab.kafka.password_file:
        p = lab.path(lab.kafka.password_file)
        where = f"kafka.password_file ({p})"
        try:
            text = read_regular(p, "kafka.password_file", 4096).decode()
        except FileNotFoundError:
            raise LabError(f"{lab.source.name}: kafka.password_file: {p} does not exist; "
                           "create it (one line) or remove the setting to generate one") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise LabError(f"{lab.source.name}: kafka.password_file: cannot read {p}: {why}"
                           ) from None
        pw = text.rstrip("\r\n")
        if not pw:
            raise LabError(f"{lab.source.name}: kafka.password_file: {p} is empty; "
                           "put the store password on its first line")
        return pki.check_password(pw, f"{lab.source.name}: kafka.password_file ({p})"), where, False
    p = d / "store.password"
    if exists(p):
        pw = read_bytes(p, "the Kafka store password").decode("utf-8", "replace").rstrip("\r\n")
        return pki.check_password(pw, str(p)), str(p), False
    return pki.new_password(32), str(p), True


ROTATE_HINT = "restore it, or run `invoke certs --rotate kafka` to replace the CA"


def _load_ca(d: Path) -> tuple:
    crt_p, key_p = d / "ca.crt", d / "ca.key"
    try:
        cert = pki.load_certs(read_bytes(crt_p, "the Kafka CA certificate", ROTATE_HINT))[0]
    except (ValueError, IndexError):
        raise LabError(f"{crt_p}: not a PEM certificate; restore it or run "
                       "`invoke certs --rotate kafka` to replace the CA") from None
    try:
        key = pki.load_key(read_bytes(key_p, "the Kafka CA key", ROTATE_HINT))
    except (ValueError, TypeError, pki.UnsupportedAlgorithm):
        raise LabError(f"{key_p}: cannot load the Kafka CA key (not an unencrypted PEM key); "
                       "restore it or run `invoke certs --rotate kafka` to replace the CA") from None
    if not pki.same_public_key(key, cert):
        raise LabError(f"{key_p}: this key does not belong to {crt_p.name} (an interrupted "
                       "rotation?); restore the matching pair or run "
                       "`invoke certs --rotate kafka` to replace the CA")
    return cert, key


def _issued_files(d: Path) -> list[Path]:
    """Files signed by (or holding) a CA in ``d``: if any exist, the CA is in use."""
    if not d.is_dir():
        return []
    out = [p for p in d.glob("*.crt") if p.name != "ca.crt"]
    out += list(d.glob("*.p12")) + list(d.glob("*.jks"))
    return sorted(out)


def _check_stores(d: Path, password: str, where: str) -> None:
    """The existing stores must open with ``password``.

    Every JKS is checked (one SHA-1 each) and the PKCS#12 truststore is
    opened (no key inside, so it is quick); the PKCS#12 keystores were
    written with the same password as these, and opening each would cost
    ~0.1 s of RSA key validation per identity on every run.
    """
    stores = sorted(d.glob("*.jks")) if d.is_dir() else []
    if exists(d / "truststore.p12"):
        stores.append(d / "truststore.p12")
    for p in stores:
        data = read_bytes(p, "a Kafka store")
        if p.suffix == ".p12":
            try:
                pki.open_p12(data, password)
                ok = True
            except ValueError:
                ok = False
        else:
            ok = pki.jks_password_opens(data, password)
        if not ok:
            raise LabError(f"{p}: the store password from {where} does not open this keystore; "
                           "put the right password back, or run `invoke certs --force` to "
                           "re-issue the Kafka stores with this password")


def plan(lab: Lab, ws: Workspace, st: dict | None, rotate: bool, force: bool, plan_: Plan,
         new: dict, prune: bool = False) -> tuple[list[str], list[Path]]:
    d = _dir(ws)
    st = st or {}
    notes: list[str] = []
    paths: list[Path] = []
    password, pw_where, pw_new = _password(lab, d)
    pk = lab.pki

    # -- the CA: kept unless rotated; never replaced silently ---------------
    ca_cn = f"{lab.name} Kafka CA"
    ca_digest = input_digest("kafka-ca", ca_cn, pk.key_type, pk.rsa_bits, pk.ca_days)
    ca_crt_p, ca_key_p = d / "ca.crt", d / "ca.key"
    ca_new = False
    if rotate:
        ca_new = True
    elif exists(ca_crt_p) and exists(ca_key_p):
        ca, ca_key = _load_ca(d)
        if st.get("ca", {}).get("digest", ca_digest) != ca_digest:
            notes.append("CA kept although pki settings changed (`--rotate kafka` applies them)")
    elif not exists(ca_crt_p) and not exists(ca_key_p) and not _issued_files(d):
        ca_new = True
    else:
        missing = ca_key_p if not exists(ca_key_p) else ca_crt_p
        raise LabError(f"{missing}: missing while certificates of this CA exist in {d}; restore "
                       "it, or run `invoke certs --rotate kafka` to replace the CA and re-issue "
                       "every Kafka certificate")
    # the key is written before its certificate (the plan writes in order):
    # a run stopped in between leaves a pair _load_ca refuses with one line
    idents = identities(lab)
    if ca_new:              # a new CA re-issues every identity: all their keys at once
        keys = plan_.keys(1 + len(idents), pk.key_type, pk.rsa_bits)
        ca_key = keys.take()
        ca = pki.new_ca(ca_key, pki.name(ca_cn, lab.name), pk.ca_days)
        notes.append("new CA" + (" (rotated)" if rotate else ""))
        plan_.put(ca_key_p, pki.key_pem(ca_key), SECRET)
        plan_.put(ca_crt_p, pki.cert_pem(ca), PUBLIC)
    else:
        plan_.put(ca_key_p, read_bytes(ca_key_p, "the Kafka CA key"), SECRET)
        plan_.put(ca_crt_p, read_bytes(ca_crt_p, "the Kafka CA certificate"), PUBLIC)
        if ca_due(ca):
            notes.append(f"the CA has {time_left(ca)}: run `invoke certs --rotate kafka` "
                         "to replace it")
    paths += [ca_crt_p, ca_key_p]
    ca_fp = pki.fingerprint(ca)
    reissue_all = ca_new or force
    if not reissue_all:
        _check_stores(d, password, pw_where)
    plan_.put(d / "store.password", password + "\n", SECRET)
    paths.append(d / "store.password")
    if pw_new:
        notes.append("new store password")

    # -- identities ---------------------------------------------------------
    old_leaves = st.get("leaves", {}) if not reissue_all else {}
    leaves: dict[str, dict] = {}
    issued: list[str] = []
    renewed: list[str] = []
    client_pair = None
    # which identities keep their key and certificate, which need new ones
    kept: dict[str, tuple] = {}
    renewing: set[str] = set()
    digests: dict[str, str] = {}
    files: dict[str, dict[str, Path]] = {}
    for ident in idents:
        n = ident["name"]
        f = files[n] = {k: d / t.format(n=n)
                        for k, t in zip(("crt", "key", "chain", "p12", "jks"), LEAF_FILES)}
        digest = digests[n] = input_digest("kafka-leaf", ident, pk.key_type, pk.rsa_bits,
                                           pk.leaf_days, ca_fp)
        cert = key = None
        rec = old_leaves.get(n)
        if rec and rec.get("digest") == digest and exists(f["crt"]) and exists(f["key"]):
            try:
                cert = pki.load_certs(f["crt"].read_bytes())[0]
                key = pki.load_key(f["key"].read_bytes())
            except (OSError, ValueError, TypeError, IndexError, pki.UnsupportedAlgorithm):
                cert = key = None
            if cert is not None and (pki.fingerprint(cert) != rec.get("fingerprint_sha256")
                                     or not pki.same_public_key(key, cert)):
                cert = key = None
        if cert is not None:
            due = leaf_due(cert, ca)
            if due == "renew":
                renewed.append(f"{n} ({time_left(cert)})")
                renewing.add(n)
                cert = key = None
            elif due == "ca":
                notes.append(f"{n} has {time_left(cert)} and ends with the CA: run "
                             "`invoke certs --rotate kafka`")
        if cert is not None:
            kept[n] = (cert, key)
    if not ca_new:
        keys = plan_.keys(len(idents) - len(kept), pk.key_type, pk.rsa_bits)
    for ident in idents:
        n, f = ident["name"], files[ident["name"]]
        fresh = n not in kept
        if fresh:
            key = keys.take()
            cert = pki.issue(ca, ca_key, key, pki.name(ident["cn"], lab.name), pk.leaf_days,
                             ident["sans"], [_EKU[e] for e in ident["eku"]])
            if n not in renewing:
                issued.append(n)
            plan_.put(f["key"], pki.key_pem(key), SECRET)
            plan_.put(f["crt"], pki.cert_pem(cert), PUBLIC)
        else:
            cert, key = kept[n]
            plan_.put(f["key"], f["key"].read_bytes(), SECRET)
            plan_.put(f["crt"], f["crt"].read_bytes(), PUBLIC)
        plan_.put(f["chain"], pki.cert_pem(cert, ca), PUBLIC)
        if fresh or not exists(f["p12"]):
            plan_.put(f["p12"], pki.p12_keystore(n, key, cert, [ca], password), SECRET)
        if fresh or not exists(f["jks"]):
            plan_.put(f["jks"], pki.jks_keystore(n, key, cert, [ca], password), SECRET)
        paths += list(f.values())
        leaves[n] = cert_record(cert, digests[n], kind=ident["kind"])
        if ident["kind"] == "client":
            client_pair = (cert, key)
    if issued:
        notes.append("issued " + ", ".join(issued))
    if renewed:
        notes.append("renewed " + ", ".join(renewed) + " under the existing CA")

    # -- truststores (also when an interrupted rotation left the old CA in them) --
    ca_moved = st.get("ca", {}).get("fingerprint_sha256") != ca_fp
    for name, make in (("truststore.p12", pki.p12_truststore), ("truststore.jks", pki.jks_truststore)):
        p = d / name
        if reissue_all or ca_moved or not exists(p):
            plan_.put(p, make([(CA_ALIAS, ca)], password), PUBLIC)
        paths.append(p)

    # -- config snippets ----------------------------------------------------
    for h in lab.brokers():
        p = d / f"server-{h.name}.properties"
        plan_.put(p, server_properties(lab, h, password), SECRET)
        paths.append(p)
    p = d / "client-ssl.properties"
    plan_.put(p, client_properties(lab, password), SECRET)
    paths.append(p)
    cert, key = client_pair
    p = d / "client-bundle.pem"
    plan_.put(p, pki.cert_pem(cert, ca) + pki.key_pem(key), SECRET)
    paths.append(p)

    # -- identities no longer in the lab ------------------------------------
    # key material is never removed because the lab stopped naming it (an
    # empty or mistaken lab must not wipe keys): only `certs --prune` does
    gone = sorted(set(st.get("leaves", {})) - set(leaves))
    for n in gone:
        files = [p for p in (*(d / t.format(n=n) for t in LEAF_FILES),
                             d / f"server-{n}.properties") if exists(p)]
        if prune:
            plan_.removes.extend(files)
            notes.append(f"pruned {n}: {', '.join(p.name for p in files) or 'no files left'}")
        else:
            leaves[n] = st["leaves"][n]         # still known, still on disk
    if gone and not prune:
        notes.append(f"kept {', '.join(gone)}, no longer in the lab; `certs --prune` removes them")

    new["kafka"] = {"ca": cert_record(ca, ca_digest if ca_new else st.get("ca", {}).get(
                        "digest", ca_digest)),
                    "leaves": leaves,
                    "password_source": "file" if lab.kafka.password_file else "generated"}
    return notes, paths


def _store(lab: Lab, base: str) -> tuple[str, str]:
    kind = lab.kafka.store_type
    ext = "p12" if kind == "PKCS12" else "jks"
    return kind, f"{lab.kafka.ssl_dir.rstrip('/')}/{base}.{ext}"


def server_properties(lab: Lab, h: Host, password: str) -> str:
    """The broker's whole server.properties (builders.artifacts.kafka_node)."""
    return kafka_node.server_properties(lab, h, password)


def _store_settings(kind: str, keystore: str, truststore: str, password: str) -> list[str]:
    """The ssl.keystore.* / ssl.truststore.* lines brokers and clients share."""
    return [
        f"ssl.keystore.type={kind}",
        f"ssl.keystore.location={keystore}",
        f"ssl.keystore.password={password}",
        f"ssl.key.password={password}",
        f"ssl.truststore.type={kind}",
        f"ssl.truststore.location={truststore}",
        f"ssl.truststore.password={password}",
    ]


def client_properties(lab: Lab, password: str) -> str:
    kind, ks = _store(lab, f"{lab.kafka.client}.keystore")
    _, ts = _store(lab, "truststore")
    return "\n".join([
        f"# labforge: TLS settings of Kafka client {lab.kafka.client} (lab {lab.name}).",
        "# Use with kafka-console-producer.sh --producer.config / --command-config ...",
        "security.protocol=SSL",
        *_store_settings(kind, ks, ts, password),
        "ssl.endpoint.identification.algorithm=https",
        "",
    ])


def cert_files(lab: Lab, ws: Workspace) -> list[tuple[Path, Path | None]]:
    """(certificate, issuing CA certificate) for certs-check; the CA is self-signed."""
    d = _dir(ws)
    return [(d / "ca.crt", None)] + [(d / f"{i['name']}.crt", d / "ca.crt") for i in identities(lab)]
