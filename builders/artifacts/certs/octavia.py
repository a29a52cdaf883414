"""certs/octavia/: the dual-CA set Octavia expects, under the names its own tooling uses.

    server_ca.cert.pem           signs the amphorae's server certificates
    server_ca.key.pem            its key, encrypted with ca_private_key_passphrase
    server_ca-chain.cert.pem     what the controller trusts for amphorae ([haproxy_amphora] server_ca)
    client_ca.cert.pem           signs the controller's client certificate; amphorae trust it
    client_ca.key.pem            its key, encrypted with ca_private_key_passphrase
    client.cert-and-key.pem      the controller's client key + certificate ([haproxy_amphora] client_cert)
    ca_private_key_passphrase    passphrase of both CA keys ([certificates] ca_private_key_passphrase)
    server_certs_key_passphrase  32 chars, ^[A-Za-z0-9_=-]{32}$ (encrypts amphora keys in Octavia's DB)
    heartbeat_key                HMAC key of amphora heartbeats ([health_manager] heartbeat_key)
    <amp_ssh_key_name>[.pub]     the amphora SSH key pair ([controller_worker] amp_ssh_key_name)
    octavia-certificates.conf    the options above plus [controller_worker] and [health_manager]
                                 settings from the lab, ready for /etc/octavia/octavia.conf.d/

Both CAs are self-signed roots without intermediates (see docs/certs.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from builders.tools import pki
from builders.artifacts.certs.common import (PUBLIC, SECRET, Plan, ca_due, cert_record, exists,
                                             leaf_due, read_bytes, time_left)
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import input_digest
from builders.core.workspace import Workspace

PASSPHRASE_RE = re.compile(r"^[A-Za-z0-9_=-]{32}$")
CLIENT_CN = "octavia-controller"

F = {
    "server_ca": "server_ca.cert.pem",
    "server_ca_key": "server_ca.key.pem",
    "server_chain": "server_ca-chain.cert.pem",
    "client_ca": "client_ca.cert.pem",
    "client_ca_key": "client_ca.key.pem",
    "client": "client.cert-and-key.pem",
    "ca_pass": "ca_private_key_passphrase",
    "certs_pass": "server_certs_key_passphrase",
    "heartbeat": "heartbeat_key",
    "conf": "octavia-certificates.conf",
}


def _dir(ws: Workspace) -> Path:
    return ws.certs / "octavia"


def _read_secret(p: Path, what: str) -> str:
    return read_bytes(p, what).decode("utf-8", "replace").strip()


ROTATE_HINT = "restore it, or run `invoke certs --rotate octavia` to replace both CAs"


def _load_ca(crt_p: Path, key_p: Path, passphrase: str) -> tuple:
    try:
        cert = pki.load_certs(read_bytes(crt_p, "an Octavia CA certificate", ROTATE_HINT))[0]
    except (ValueError, IndexError):
        raise LabError(f"{crt_p}: not a PEM certificate; restore it or run "
                       "`invoke certs --rotate octavia`") from None
    try:
        key = pki.load_key(read_bytes(key_p, "an Octavia CA key", ROTATE_HINT), passphrase)
    except (ValueError, TypeError, pki.UnsupportedAlgorithm):
        raise LabError(f"{key_p}: cannot open this CA key with the passphrase in "
                       f"{F['ca_pass']}; restore the matching pair or run "
                       "`invoke certs --rotate octavia`") from None
    if not pki.same_public_key(key, cert):
        raise LabError(f"{key_p}: this key does not belong to {crt_p.name} (an interrupted "
                       "rotation?); restore the matching pair or run "
                       "`invoke certs --rotate octavia` to replace both CAs")
    return cert, key


def plan(lab: Lab, ws: Workspace, st: dict | None, rotate: bool, force: bool, plan_: Plan,
         new: dict) -> tuple[list[str], list[Path]]:
    d = _dir(ws)
    st = st or {}
    pk = lab.pki
    notes: list[str] = []
    paths: list[Path] = []

    def keep_or(name: str, make, mode=SECRET, what="") -> str:
        p = d / F[name] if name in F else d / name
        if exists(p):
            value = _read_secret(p, what or name)
        else:
            value = make()
            notes.append(f"new {what or name}")
        plan_.put(p, value + "\n", mode)
        paths.append(p)
        return value

    # -- passphrases and keys that outlive rotations ---------------------------
    ca_pass_p = d / F["ca_pass"]
    if not exists(ca_pass_p) and not rotate and (exists(d / F["server_ca_key"])
                                                 or exists(d / F["client_ca_key"])):
        raise LabError(f"{ca_pass_p}: missing, so the CA keys cannot be opened; restore it or "
                       "run `invoke certs --rotate octavia` to replace both CAs")
    ca_pass = keep_or("ca_pass", lambda: pki.new_password(32), what="CA key passphrase")
    certs_pass = keep_or("certs_pass", pki.new_octavia_passphrase,
                         what="server_certs_key_passphrase")
    if not PASSPHRASE_RE.match(certs_pass):
        raise LabError(f"{d / F['certs_pass']}: Octavia needs 32 characters of A-Z a-z 0-9 _ = -; "
                       "fix it or delete it to generate one")
    heartbeat = keep_or("heartbeat", lambda: pki.new_password(32), what="heartbeat key")

    ssh_priv = d / lab.octavia.amp_ssh_key_name
    ssh_pub = d / f"{lab.octavia.amp_ssh_key_name}.pub"
    if exists(ssh_priv):
        data = read_bytes(ssh_priv, "the amphora SSH key")
        try:
            key = pki.load_ssh_key(data)
        except (ValueError, TypeError, pki.UnsupportedAlgorithm):
            raise LabError(f"{ssh_priv}: not an unencrypted OpenSSH private key; restore it or "
                           "delete both key files to make a new one") from None
        pub = pki.ssh_key_files(key, f"{lab.octavia.amp_ssh_key_name}@{lab.name}").public
        if exists(ssh_pub) and read_bytes(ssh_pub, "the amphora SSH public key").split()[:2] == pub.split()[:2]:
            pub = read_bytes(ssh_pub, "the amphora SSH public key")
        plan_.put(ssh_priv, data, SECRET)
        plan_.put(ssh_pub, pub, PUBLIC)
    else:
        files = pki.new_ssh_key(f"{lab.octavia.amp_ssh_key_name}@{lab.name}")
        plan_.put(ssh_priv, files.private, SECRET)
        plan_.put(ssh_pub, files.public, PUBLIC)
        pub = files.public
        notes.append("new amphora SSH key")
    paths += [ssh_priv, ssh_pub]

    # -- the two CAs ---------------------------------------------------------
    # a new CA needs a key, a new client CA also one for the client certificate:
    # all of them made at once (a CA that is kept never needs one here)
    new_cas = [role for role in ("server", "client")
               if rotate or not (exists(d / F[f"{role}_ca"]) and exists(d / F[f"{role}_ca_key"]))]
    keys = plan_.keys(len(new_cas) + ("client" in new_cas), pk.key_type, pk.rsa_bits)
    cas = {}
    for role, cn in (("server", f"{lab.name} Octavia server CA"),
                     ("client", f"{lab.name} Octavia client CA")):
        crt_p, key_p = d / F[f"{role}_ca"], d / F[f"{role}_ca_key"]
        digest = input_digest("octavia-ca", role, cn, pk.key_type, pk.rsa_bits, pk.ca_days)
        in_use = exists(d / F["client"]) if role == "client" else bool(st.get("server_ca"))
        if not rotate and exists(crt_p) and exists(key_p):
            cert, key = _load_ca(crt_p, key_p, ca_pass)
            fresh = False
            old = st.get(f"{role}_ca", {})
            digest = old.get("digest", digest)
            plan_.put(key_p, read_bytes(key_p, "an Octavia CA key"), SECRET)
            plan_.put(crt_p, read_bytes(crt_p, "an Octavia CA certificate"), PUBLIC)
            if ca_due(cert):
                notes.append(f"the {role} CA has {time_left(cert)}: run "
                             "`invoke certs --rotate octavia` to replace both CAs")
        elif not rotate and (exists(crt_p) or exists(key_p) or in_use):
            missing = key_p if not exists(key_p) else crt_p
            raise LabError(f"{missing}: missing while the Octavia {role} CA is in use; restore it "
                           "or run `invoke certs --rotate octavia` to replace both CAs")
        else:
            key = keys.take()
            cert = pki.new_ca(key, pki.name(cn, lab.name), pk.ca_days)
            fresh = True
            notes.append(f"new {role} CA" + (" (rotated)" if rotate else ""))
            # key before certificate: a run stopped in between leaves a pair
            # that _load_ca refuses with one line
            plan_.put(key_p, pki.key_pem(key, ca_pass), SECRET)
            plan_.put(crt_p, pki.cert_pem(cert), PUBLIC)
        cas[role] = (cert, key, fresh, digest)
        paths += [crt_p, key_p]
    server_ca = cas["server"][0]
    plan_.put(d / F["server_chain"], pki.cert_pem(server_ca), PUBLIC)
    paths.append(d / F["server_chain"])

    # -- the controller's client certificate ---------------------------------
    client_ca, client_ca_key, client_ca_fresh, _ = cas["client"]
    cp = d / F["client"]
    digest = input_digest("octavia-client", CLIENT_CN, pk.key_type, pk.rsa_bits, pk.leaf_days,
                          pki.fingerprint(client_ca))
    rec = st.get("client", {})
    cert = None
    if not (force or client_ca_fresh) and rec.get("digest") == digest and exists(cp):
        try:
            data = cp.read_bytes()
            cert, key = pki.load_certs(data)[0], pki.load_key(data)
            if pki.fingerprint(cert) != rec.get("fingerprint_sha256") or not pki.same_public_key(key, cert):
                cert = None
        except (OSError, ValueError, TypeError, IndexError, pki.UnsupportedAlgorithm):
            cert = None
    renewing = ""
    if cert is not None:
        due = leaf_due(cert, client_ca)
        if due == "renew":
            renewing = time_left(cert)
            cert = None
        elif due == "ca":
            notes.append(f"the controller client certificate has {time_left(cert)} and ends "
                         "with its CA: run `invoke certs --rotate octavia`")
    if cert is None:
        key = keys.take()
        cert = pki.issue(client_ca, client_ca_key, key, pki.name(CLIENT_CN, lab.name),
                         pk.leaf_days, [CLIENT_CN], [pki.CLIENT_AUTH])
        plan_.put(cp, pki.key_pem(key) + pki.cert_pem(cert), SECRET)
        notes.append(f"renewed controller client certificate ({renewing}) under the existing "
                     "client CA" if renewing else "issued controller client certificate")
    else:
        plan_.put(cp, data, SECRET)
    paths.append(cp)

    # -- the configuration snippet --------------------------------------------
    plan_.put(d / F["conf"], conf(lab, ws, ca_pass, certs_pass, heartbeat), SECRET)
    paths.append(d / F["conf"])

    new["octavia"] = {
        "server_ca": cert_record(cas["server"][0], cas["server"][3]),
        "client_ca": cert_record(cas["client"][0], cas["client"][3]),
        "client": cert_record(cert, digest),
        "amp_ssh_key": {"name": lab.octavia.amp_ssh_key_name,
                        "fingerprint": pki.ssh_fingerprint(pub)},
    }
    return notes, paths


def certs_dir(lab: Lab, ws: Workspace) -> str:
    return (lab.octavia.certs_dir or str(_dir(ws).resolve())).rstrip("/")


def conf(lab: Lab, ws: Workspace, ca_pass: str, certs_pass: str, heartbeat: str) -> str:
    """The Octavia configuration snippet a user pastes: certificates, the
    controller's amphora settings and the health manager, from the lab."""
    cd = certs_dir(lab, ws)
    o = lab.octavia
    hm_ip, _, hm_port = o.health_managers[0].rpartition(":")

    def cloud_id(key: str, value, what: str) -> list[str]:
        if value:
            return [f"{key} = {', '.join(value) if isinstance(value, tuple) else value}"]
        return [f"# PLACEHOLDER: {what}; set octavia.{key} in lab.yaml, or here:",
                f"# {key} = <{what}>"]

    return "\n".join([
        f"# labforge: Octavia settings of lab {lab.name}.",
        "# Drop into /etc/octavia/octavia.conf.d/ or merge into octavia.conf.",
        "# Holds passphrases and the heartbeat key: keep it private (0600).",
        "[certificates]",
        "cert_generator = local_cert_generator",
        f"ca_certificate = {cd}/{F['server_ca']}",
        f"ca_private_key = {cd}/{F['server_ca_key']}",
        f"ca_private_key_passphrase = {ca_pass}",
        f"server_certs_key_passphrase = {certs_pass}",
        "signing_digest = sha256",
        f"cert_validity_time = {o.cert_validity_days * 86400}",
        "",
        "[controller_worker]",
        f"client_ca = {cd}/{F['client_ca']}",
        f"amp_ssh_key_name = {o.amp_ssh_key_name}",
        f"amp_image_tag = {o.amp_image_tag}",
        *cloud_id("amp_boot_network_list", o.amp_boot_network_list,
                  "ID of the amphora management network (lb-mgmt-net)"),
        *cloud_id("amp_secgroup_list", o.amp_secgroup_list,
                  "ID of the amphora security group (lb-mgmt-sec-grp)"),
        *cloud_id("amp_flavor_id", o.amp_flavor_id, "ID of the amphora flavor"),
        "",
        "[haproxy_amphora]",
        f"client_cert = {cd}/{F['client']}",
        f"server_ca = {cd}/{F['server_chain']}",
        "",
        "[health_manager]",
        "# this controller's health manager: the first of octavia.health_managers",
        f"bind_ip = {hm_ip.strip('[]')}",
        f"bind_port = {hm_port}",
        f"heartbeat_key = {heartbeat}",
        f"controller_ip_port_list = {', '.join(o.health_managers)}",
        "",
    ])


def issue_amphora_cert(lab: Lab, ws: Workspace, amphora_id: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for one amphora, signed by the Octavia server CA.

    What Octavia's controller does per amphora with its local certificate
    generator: CN and DNS SAN = the amphora id, serverAuth + clientAuth,
    valid for ``octavia.cert_validity_days``.  The amphora check
    (builders.checks.amphora_check) calls it for the throwaway amphora it
    boots.

    It only reads certs/octavia/ (the server CA, its key and passphrase; a
    missing or mismatched one is a LabError saying what to run) and writes
    nothing: the certificate and key are returned, not stored under certs/
    nor in certs/state.json, as Octavia keeps amphora certificates in its
    database, not next to the CA.  Each call issues a new key and serial.
    """
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$", amphora_id):
        raise LabError(f"amphora id {amphora_id!r}: use letters, digits, '.', '-' (a DNS label)")
    d = _dir(ws)
    ca_pass = _read_secret(d / F["ca_pass"], "the Octavia CA key passphrase")
    ca, ca_key = _load_ca(d / F["server_ca"], d / F["server_ca_key"], ca_pass)
    key = pki.new_key(lab.pki.key_type, lab.pki.rsa_bits)
    cert = pki.issue(ca, ca_key, key, pki.name(amphora_id), lab.octavia.cert_validity_days,
                     [amphora_id], [pki.SERVER_AUTH, pki.CLIENT_AUTH])
    return pki.cert_pem(cert), pki.key_pem(key)


def cert_files(lab: Lab, ws: Workspace) -> list[tuple[Path, Path | None]]:
    d = _dir(ws)
    return [(d / F["server_ca"], None), (d / F["client_ca"], None),
            (d / F["client"], d / F["client_ca"])]
