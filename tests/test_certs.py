"""`invoke certs` as a library: layout, idempotency, re-issue rules, Octavia set.

Real-tool checks (openssl, keytool, Java and Python TLS handshakes, CLI bad
input) are in test_certs_tools.py.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from builders.artifacts import certs
from builders.core import contract

from builders.tools import pki
from builders.artifacts.certs import (build_certs, check_certs, issue_amphora_cert, lab_ssh_public_key)
from builders.core.errors import LabError
from builders.core.workspace import Workspace

from helpers import changed, lab_from, tree_snapshot

KAFKA_IDS = ("broker1", "broker2", "broker3", "kafka-client")


@pytest.fixture
def built(ws, default_lab):
    build_certs(default_lab, ws)
    return ws


def test_layout_modes_and_no_manifest(built: Workspace):
    k = built.certs / "kafka"
    for n in KAFKA_IDS:
        for suffix in (".crt", ".key", "-chain.pem", ".keystore.p12", ".keystore.jks"):
            assert (k / f"{n}{suffix}").is_file(), n + suffix
    for n in ("ca.crt", "ca.key", "truststore.p12", "truststore.jks", "store.password",
              "server-broker1.properties", "server-broker3.properties",
              "client-ssl.properties", "client-bundle.pem"):
        assert (k / n).is_file(), n
    o = built.certs / "octavia"
    for n in ("server_ca.cert.pem", "server_ca.key.pem", "server_ca-chain.cert.pem",
              "client_ca.cert.pem", "client.cert-and-key.pem", "server_certs_key_passphrase",
              "ca_private_key_passphrase", "heartbeat_key", "octavia_ssh_key",
              "octavia_ssh_key.pub", "octavia-certificates.conf"):
        assert (o / n).is_file(), n
    for d in (built.certs, k, o, built.certs / "ssh"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for p in [k / "ca.key", k / "broker1.key", k / "store.password", k / "broker1.keystore.jks",
              o / "server_ca.key.pem", o / "server_certs_key_passphrase", o / "heartbeat_key",
              o / "octavia_ssh_key", built.certs / "ssh" / "lab_ed25519"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # certs are never recorded in the publishable manifest
    assert not (built.artifacts / "manifest.json").exists()


def test_state_json_holds_no_secret(built: Workspace):
    state = (built.certs / "state.json").read_text()
    secrets = [(built.certs / "kafka" / "store.password").read_text().strip()]
    secrets += [(built.certs / "octavia" / n).read_text().strip()
                for n in ("ca_private_key_passphrase", "server_certs_key_passphrase",
                          "heartbeat_key")]
    for s in secrets:
        assert s not in state
    assert "PRIVATE KEY" not in state
    data = json.loads(state)
    assert set(data["kafka"]["leaves"]) == set(KAFKA_IDS)


def test_second_run_changes_nothing(built: Workspace, default_lab):
    before = tree_snapshot(built.certs, mtimes=True)
    outcomes = build_certs(default_lab, built)
    assert [o.status for o in outcomes] == ["up to date"] * 3
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == set()


def test_certificates_say_what_the_lab_says(built: Workspace, default_lab):
    k = built.certs / "kafka"
    ca = x509.load_pem_x509_certificate((k / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 3650
    b2 = x509.load_pem_x509_certificate((k / "broker2.crt").read_bytes())
    assert pki.sans_of(b2) == ["DNS:broker2", "DNS:broker2.lab.internal", "IP:192.168.100.12",
                               "IP:10.100.0.12"]
    eku = b2.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [pki.SERVER_AUTH, pki.CLIENT_AUTH]
    assert b2.public_key().key_size == 2048
    assert b2.signature_hash_algorithm.name == "sha256"
    assert (b2.not_valid_after_utc - b2.not_valid_before_utc).days == 825
    client = x509.load_pem_x509_certificate((k / "kafka-client.crt").read_bytes())
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [pki.CLIENT_AUTH]
    serials = {x509.load_pem_x509_certificate((k / f"{n}.crt").read_bytes()).serial_number
               for n in KAFKA_IDS}
    assert len(serials) == 4 and all(s.bit_length() > 64 for s in serials)


def test_properties_reference_the_stores(built: Workspace):
    k = built.certs / "kafka"
    pw = (k / "store.password").read_text().strip()
    props = dict(line.split("=", 1) for line in (k / "server-broker1.properties").read_text()
                 .splitlines() if line and not line.startswith("#"))
    assert props["ssl.client.auth"] == "required"
    assert props["ssl.keystore.location"] == "/etc/kafka/ssl/broker1.keystore.p12"
    assert props["ssl.truststore.location"] == "/etc/kafka/ssl/truststore.p12"
    assert props["ssl.keystore.password"] == props["ssl.truststore.password"] == pw
    assert props["advertised.listeners"] == \
        "PLAINTEXT://broker1.lab.internal:9092,SSL://192.168.100.11:9093"
    client = (k / "client-ssl.properties").read_text()
    assert "security.protocol=SSL" in client and "kafka-client.keystore.p12" in client
    # the stores open with that password and hold what they should
    ks = pkcs12.load_pkcs12((k / "broker1.keystore.p12").read_bytes(), pw.encode())
    assert ks.key is not None and len(ks.additional_certs) == 1
    ts = pkcs12.load_pkcs12((k / "truststore.p12").read_bytes(), pw.encode())
    assert ts.key is None and len(ts.additional_certs) == 1


def test_adding_a_broker_issues_only_that_broker(built: Workspace, tmp_path):
    before = tree_snapshot(built.certs, mtimes=True)
    lab4 = lab_from(tmp_path / "lab4", **{"hosts.broker4": {"nics": [
        {"network": "public", "ip": "192.168.100.14", "mac": "52:54:00:10:00:0e"},
        {"network": "private", "ip": "10.100.0.14", "mac": "52:54:00:64:00:0e"}]}})
    out = {o.step: o for o in build_certs(lab4, built)}
    assert "issued broker4" in out["certs kafka"].detail
    assert "CA" not in out["certs kafka"].detail
    diff = changed(before, tree_snapshot(built.certs, mtimes=True))
    # the other brokers' server.properties name the ensemble, broker4 now in it
    others = {f"kafka/server-broker{i}.properties" for i in (1, 2, 3)}
    assert diff == {"kafka/broker4.crt", "kafka/broker4.key", "kafka/broker4-chain.pem",
                    "kafka/broker4.keystore.p12", "kafka/broker4.keystore.jks",
                    "kafka/server-broker4.properties", "state.json", *others}
    ca = x509.load_pem_x509_certificate((built.certs / "kafka" / "ca.crt").read_bytes())
    b4 = x509.load_pem_x509_certificate((built.certs / "kafka" / "broker4.crt").read_bytes())
    b4.verify_directly_issued_by(ca)
    # a lab that stops naming it keeps its key material, and says so
    after_add = tree_snapshot(built.certs, mtimes=True)
    out = {o.step: o for o in build_certs(lab_from(tmp_path / "lab3"), built)}
    # broker4's key material stays; the others' server.properties drop it from the ensemble
    assert changed(after_add, tree_snapshot(built.certs, mtimes=True)) <= {"state.json", *others}
    assert "kept broker4, no longer in the lab; `certs --prune` removes them" in out["certs kafka"].detail
    # --prune removes exactly its material, listed, reported as a change
    out = {o.step: o for o in build_certs(lab_from(tmp_path / "lab3"), built, prune=True)}
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == {"state.json", *others}
    assert (out["certs kafka"].status, out["certs kafka"].detail) == (
        "built", "pruned broker4: broker4.crt, broker4.key, broker4-chain.pem, "
        "broker4.keystore.p12, broker4.keystore.jks, server-broker4.properties")
    assert out["certs octavia"].status == "up to date"


def test_changing_one_ip_reissues_exactly_that_broker(built: Workspace, tmp_path):
    before = tree_snapshot(built.certs, mtimes=True)
    lab = lab_from(tmp_path / "ip", **{"hosts.broker2.ip": "10.100.0.22"})
    build_certs(lab, built)
    diff = changed(before, tree_snapshot(built.certs, mtimes=True))
    assert diff == {"kafka/broker2.crt", "kafka/broker2.key", "kafka/broker2-chain.pem",
                    "kafka/broker2.keystore.p12", "kafka/broker2.keystore.jks", "state.json",
                    "kafka/server-broker2.properties"}          # its PLAINTEXT listener
    b2 = x509.load_pem_x509_certificate((built.certs / "kafka" / "broker2.crt").read_bytes())
    assert "IP:10.100.0.22" in pki.sans_of(b2)


def test_rotate_replaces_one_set_only(built: Workspace, default_lab):
    before = tree_snapshot(built.certs, mtimes=True)
    out = {o.step: o for o in build_certs(default_lab, built, rotate=("kafka",))}
    assert "new CA (rotated)" in out["certs kafka"].detail
    assert out["certs octavia"].status == "up to date"
    diff = changed(before, tree_snapshot(built.certs, mtimes=True))
    assert "kafka/ca.crt" in diff and "kafka/ca.key" in diff and "kafka/truststore.jks" in diff
    assert all(f"kafka/{n}.crt" in diff for n in KAFKA_IDS)
    assert not any(d.startswith(("octavia/", "ssh/")) for d in diff)
    assert "kafka/store.password" not in diff  # passwords outlive a rotation
    with pytest.raises(LabError, match="unknown set 'foo'"):
        build_certs(default_lab, built, rotate=("foo",))


def test_force_reissues_leaves_under_the_same_ca(built: Workspace, default_lab):
    before = tree_snapshot(built.certs, mtimes=True)
    build_certs(default_lab, built, force=True)
    diff = changed(before, tree_snapshot(built.certs, mtimes=True))
    assert "kafka/ca.crt" not in diff and "kafka/ca.key" not in diff
    assert "octavia/server_ca.cert.pem" not in diff
    assert {f"kafka/{n}.crt" for n in KAFKA_IDS} <= diff
    assert "octavia/client.cert-and-key.pem" in diff


@pytest.mark.parametrize("lost", ["ca.key", "ca.crt"])
def test_a_ca_is_never_replaced_silently(built: Workspace, default_lab, lost):
    (built.certs / "kafka" / lost).unlink()
    before = tree_snapshot(built.certs, mtimes=True)
    with pytest.raises(LabError, match=rf"{lost}: missing while certificates.*--rotate kafka"):
        build_certs(default_lab, built)
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == set()
    build_certs(default_lab, built, rotate=("kafka",))
    assert (built.certs / "kafka" / lost).exists()


def test_octavia_ca_never_replaced_silently(built: Workspace, default_lab):
    (built.certs / "octavia" / "server_ca.key.pem").unlink()
    with pytest.raises(LabError, match="server_ca.key.pem: missing.*--rotate octavia"):
        build_certs(default_lab, built)


def test_deleted_keystore_is_rebuilt_from_the_same_key(built: Workspace, default_lab):
    k = built.certs / "kafka"
    (k / "broker3.keystore.jks").unlink()
    before = tree_snapshot(built.certs, mtimes=True)
    build_certs(default_lab, built)
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == {"kafka/broker3.keystore.jks"}


def test_ecdsa_option(ws, tmp_path):
    lab = lab_from(tmp_path / "ec", **{"pki.key_type": "ecdsa"})
    build_certs(lab, ws)
    c = x509.load_pem_x509_certificate((ws.certs / "kafka" / "broker1.crt").read_bytes())
    assert c.public_key().curve.name == "secp256r1"


def test_octavia_set(built: Workspace, default_lab):
    o = built.certs / "octavia"
    assert re.fullmatch(r"[A-Za-z0-9_=-]{32}", (o / "server_certs_key_passphrase").read_text().strip())
    assert len((o / "heartbeat_key").read_text().strip()) >= 32
    passphrase = (o / "ca_private_key_passphrase").read_text().strip().encode()
    key_pem = (o / "server_ca.key.pem").read_bytes()
    assert b"ENCRYPTED" in key_pem
    with pytest.raises(TypeError):          # no passphrase: refused
        serialization.load_pem_private_key(key_pem, None)
    with pytest.raises(ValueError):         # wrong passphrase: refused
        serialization.load_pem_private_key(key_pem, b"wrong-passphrase")
    ca_key = serialization.load_pem_private_key(key_pem, passphrase)
    ca = x509.load_pem_x509_certificate((o / "server_ca.cert.pem").read_bytes())
    assert pki.same_public_key(ca_key, ca)
    # client key + cert in one PEM loads as both
    both = (o / "client.cert-and-key.pem").read_bytes()
    key = serialization.load_pem_private_key(both, None)
    cert = x509.load_pem_x509_certificate(both)
    assert pki.same_public_key(key, cert)
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((o / "client_ca.cert.pem").read_bytes()))
    assert (o / "octavia_ssh_key.pub").read_text().startswith("ssh-ed25519 ")


def test_octavia_conf_names_existing_files(built: Workspace):
    import configparser
    conf = configparser.ConfigParser()
    conf.read(built.certs / "octavia" / "octavia-certificates.conf")
    assert set(conf.sections()) == {"certificates", "controller_worker", "haproxy_amphora",
                                    "health_manager"}
    files = [conf["certificates"]["ca_certificate"], conf["certificates"]["ca_private_key"],
             conf["controller_worker"]["client_ca"], conf["haproxy_amphora"]["client_cert"],
             conf["haproxy_amphora"]["server_ca"]]
    for f in files:
        assert Path(f).parent == (built.certs / "octavia").resolve()
        assert Path(f).is_file(), f
    o = built.certs / "octavia"
    assert conf["certificates"]["ca_private_key_passphrase"] == \
        (o / "ca_private_key_passphrase").read_text().strip()
    assert conf["certificates"]["server_certs_key_passphrase"] == \
        (o / "server_certs_key_passphrase").read_text().strip()
    assert conf["health_manager"]["heartbeat_key"] == (o / "heartbeat_key").read_text().strip()
    assert conf["controller_worker"]["amp_ssh_key_name"] == "octavia_ssh_key"
    assert conf["controller_worker"]["amp_image_tag"] == "amphora"
    assert conf["health_manager"]["controller_ip_port_list"] == "10.100.0.5:5555"


def test_issue_amphora_cert(built: Workspace, default_lab):
    """Issuing an amphora's certificate (what the amphora check does) reads the
    server CA and writes nothing under certs/: no file, no state.json entry."""
    before = tree_snapshot(built.certs, mtimes=True)
    cert_pem, key_pem = issue_amphora_cert(default_lab, built, "0f3a6e2c-amp-1")
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == set()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    assert pki.same_public_key(key, cert)
    ca = x509.load_pem_x509_certificate(
        (built.certs / "octavia" / "server_ca-chain.cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert pki.sans_of(cert) == ["DNS:0f3a6e2c-amp-1"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30


def test_issue_amphora_cert_needs_the_set(ws, default_lab):
    with pytest.raises(LabError, match="run `invoke certs`"):
        issue_amphora_cert(default_lab, ws, "amp1")
    assert not ws.certs.exists() or not any(ws.certs.rglob("*"))


def test_lab_ssh_key(built: Workspace):
    line = lab_ssh_public_key(built)
    assert line.startswith("ssh-ed25519 ")
    priv = (built.certs / "ssh" / "lab_ed25519").read_bytes()
    assert priv.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(priv, None)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    assert line.split()[:2] == pub.split()[:2]


def test_lab_ssh_key_missing(ws):
    with pytest.raises(LabError, match="run `invoke certs`"):
        lab_ssh_public_key(ws)


def test_check_certs_ok_then_warns(built: Workspace, default_lab, tmp_path):
    rows = check_certs(default_lab, built)
    assert len(rows) == 8 and all(r.ok for r in rows), [r.problems for r in rows]
    b1 = next(r for r in rows if r.path.name == "broker1.crt")
    assert "IP:10.100.0.11" in b1.sans and 820 < b1.days_left <= 825
    # leaves valid 20 days: certs-check with the default 30 warns
    short = lab_from(tmp_path / "short", **{"pki.leaf_days": 20})
    build_certs(short, built, force=True)
    rows = check_certs(short, built, warn_days=30)
    assert {r.path.name for r in rows if not r.ok} == {
        "broker1.crt", "broker2.crt", "broker3.crt", "kafka-client.crt",
        "client.cert-and-key.pem"}
    assert all(r.ok for r in check_certs(short, built, warn_days=10))


def test_check_certs_detects_a_foreign_signature(built: Workspace, default_lab, tmp_path):
    other = Workspace(tmp_path / "other")
    build_certs(default_lab, other)
    (built.certs / "kafka" / "broker2.crt").write_bytes(
        (other.certs / "kafka" / "broker2.crt").read_bytes())
    bad = [r for r in check_certs(default_lab, built) if not r.ok]
    # a certificate from elsewhere: not signed by the CA, and not the key's or the stores'
    assert [(r.path.name, r.problems) for r in bad] == [("broker2.crt", [
        "not signed by ca.crt", "its key does not belong to it (broker2.key)",
        "broker2.keystore.p12 does not hold the key of its certificate",
        "broker2.keystore.jks does not hold the key of its certificate"])]


def test_check_certs_without_certs(ws, default_lab):
    with pytest.raises(LabError, match="run `invoke certs` first"):
        check_certs(default_lab, ws)


def test_jks_password_check_agrees_with_the_reader(built: Workspace):
    k = built.certs / "kafka"
    pw = (k / "store.password").read_text().strip()
    for n in ("truststore.jks", "broker1.keystore.jks"):
        data = (k / n).read_bytes()
        assert pki.jks_password_opens(data, pw)
        pki.open_jks(data, pw)
        assert not pki.jks_password_opens(data, pw + "x")
        with pytest.raises(ValueError):
            pki.open_jks(data, pw + "x")


@pytest.mark.parametrize("key_type,bits", [("rsa", 4096), ("ecdsa", 0)])
def test_jks_written_by_labforge_reads_back(key_type, bits):
    """Writer and reader round trip: the key opens to the same PKCS#8 (keys
    of any length: the XOR stream spans several SHA-1 blocks), the chain and
    aliases are kept, a wrong password fails.  keytool, the independent
    reader and writer, is in test_certs_tools."""
    from cryptography.hazmat.primitives import serialization
    key = pki.new_key(key_type, bits or 2048)
    ca_key = pki.new_key("ecdsa")
    ca = pki.new_ca(ca_key, pki.name("t CA"), 30)
    cert = pki.issue(ca, ca_key, key, pki.name("Node1"), 30, ["node1"], [pki.SERVER_AUTH])
    store = pki.open_jks(pki.jks_keystore("Node1", key, cert, [ca], "pw-1"), "pw-1")
    pkcs8, chain = store.keys["node1"]              # Java lower-cases aliases
    assert pkcs8 == key.private_bytes(pki.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    assert chain == [c.public_bytes(pki.DER) for c in (cert, ca)]
    trust = pki.open_jks(pki.jks_truststore([("ca", ca), ("Other", cert)], "pw-2"), "pw-2")
    assert sorted(trust.certs) == ["ca", "other"]
    with pytest.raises(ValueError):
        pki.open_jks(pki.jks_truststore([("ca", ca)], "pw-2"), "pw-3")


def test_key_supply_makes_distinct_keys_and_stops_when_closed():
    with pki.KeySupply(3, "rsa", 2048) as keys:
        made = [keys.take() for _ in range(4)]      # one more than planned: made on demand
    assert len({k.public_key().public_numbers().n for k in made}) == 4
    left = pki.KeySupply(8, "rsa", 2048)
    left.take()
    left.close()                                     # the rest are cancelled, not awaited
    assert left.take().key_size == 2048              # and a closed supply still serves


def test_lost_state_keeps_the_ca_and_reissues_leaves(built: Workspace, default_lab):
    k = built.certs / "kafka"
    ca_before = (k / "ca.crt").read_bytes()
    (built.certs / "state.json").unlink()
    build_certs(default_lab, built)
    assert (k / "ca.crt").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    for n in KAFKA_IDS:
        x509.load_pem_x509_certificate((k / f"{n}.crt").read_bytes()).verify_directly_issued_by(ca)
    before = tree_snapshot(built.certs, mtimes=True)
    build_certs(default_lab, built)
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == set()


# ---- expiry: leaves are renewed, CAs need --rotate ---------------------------
def _back_date(monkeypatch, days: int) -> None:
    """Issue as if it were ``days`` ago (the certificates' notBefore moves back)."""
    then = pki._now() - datetime.timedelta(days=days)
    monkeypatch.setattr(pki, "_now", lambda: then)


def test_renewal_window():
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = pki.new_key("ecdsa")
    ca = pki.new_ca(ca_key, pki.name("t CA"), 3650)

    def leaf(days):
        return pki.issue(ca, ca_key, pki.new_key("ecdsa"), pki.name("x"), days)
    assert certs.renewal_window(leaf(825)) == datetime.timedelta(days=30)
    assert certs.renewal_window(leaf(30)) == datetime.timedelta(days=10)
    assert certs.leaf_due(leaf(825), ca, now) == "ok"
    assert certs.leaf_due(leaf(825), ca, now + datetime.timedelta(days=796)) == "renew"
    assert certs.leaf_due(leaf(3), ca, now) == "ok"        # a short life is not renewed at once
    assert certs.leaf_due(leaf(3), ca, now + datetime.timedelta(days=2, hours=1)) == "renew"
    # a leaf that ends with its CA cannot be renewed: the CA must be rotated
    assert certs.leaf_due(leaf(3650), ca, now + datetime.timedelta(days=3640)) == "ca"
    assert not certs.ca_due(ca, now) and certs.ca_due(ca, now + datetime.timedelta(days=3630))


def test_expiring_leaves_are_renewed_under_the_same_ca(ws, default_lab, monkeypatch):
    with monkeypatch.context() as m:
        _back_date(m, 800)                                 # 825-day leaves: 25 days left
        build_certs(default_lab, ws)
    k = ws.certs / "kafka"
    rows = check_certs(default_lab, ws)
    bad = [r for r in rows if not r.ok]
    assert {r.path.name for r in bad} == {"broker1.crt", "broker2.crt", "broker3.crt",
                                          "kafka-client.crt", "client.cert-and-key.pem"}
    assert certs.fix_hint(bad) == "run `invoke certs` to renew the expiring leaves"
    cas = {n: (k / n).read_bytes() for n in ("ca.crt", "ca.key")}
    before = tree_snapshot(ws.certs, mtimes=True)
    out = {o_.step: o_ for o_ in build_certs(default_lab, ws)}
    assert out["certs kafka"].status == "built"
    assert "renewed broker1 (24 days left), broker2 (24 days left)" in out["certs kafka"].detail
    assert "under the existing CA" in out["certs kafka"].detail
    assert "renewed controller client certificate" in out["certs octavia"].detail
    assert {n: (k / n).read_bytes() for n in cas} == cas
    diff = changed(before, tree_snapshot(ws.certs, mtimes=True))
    assert "kafka/ca.crt" not in diff and "octavia/server_ca.cert.pem" not in diff
    assert {f"kafka/{n}.{ext}" for n in KAFKA_IDS for ext in ("crt", "key", "keystore.jks")} <= diff
    ca = x509.load_pem_x509_certificate(cas["ca.crt"])
    for n in KAFKA_IDS:
        c = x509.load_pem_x509_certificate((k / f"{n}.crt").read_bytes())
        c.verify_directly_issued_by(ca)
        assert (c.not_valid_after_utc - c.not_valid_before_utc).days == 825
    assert all(r.ok for r in check_certs(default_lab, ws))
    # renewed once: the next run changes nothing
    before = tree_snapshot(ws.certs, mtimes=True)
    assert [o_.status for o_ in build_certs(default_lab, ws)] == ["up to date"] * 3
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()


def test_an_expiring_ca_needs_rotate(ws, tmp_path, monkeypatch):
    lab = lab_from(tmp_path / "short-ca", **{"pki.ca_days": 20, "pki.leaf_days": 20,
                                               "octavia.cert_validity_days": 20})
    with monkeypatch.context() as m:
        _back_date(m, 16)                                  # CA and leaves: 4 days left
        build_certs(lab, ws)
    bad = [r for r in check_certs(lab, ws) if not r.ok]
    assert "kafka/ca.crt" in {str(r.path.relative_to(ws.certs)) for r in bad}
    hint = certs.fix_hint(bad)
    assert "run `invoke certs --rotate kafka`" in hint
    assert "run `invoke certs --rotate octavia`" in hint
    assert "renew" not in hint          # `invoke certs` alone cannot help here
    # `invoke certs` says so and re-issues nothing: the leaves end with their CA
    before = tree_snapshot(ws.certs, mtimes=True)
    out = {o.step: o for o in build_certs(lab, ws)}
    assert out["certs kafka"].status == "up to date"
    assert "the CA has 3 days left: run `invoke certs --rotate kafka`" in out["certs kafka"].detail
    assert "--rotate octavia" in out["certs octavia"].detail
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()
    build_certs(lab, ws, rotate=("kafka", "octavia"))
    assert all(r.ok for r in check_certs(lab, ws, warn_days=10))


def test_an_interrupted_rotation_is_refused_in_one_line(built: Workspace, default_lab,
                                                        monkeypatch):
    """The CA key is written before its certificate; a run stopped in between
    leaves a pair the next run refuses (never a silent mismatch)."""
    k = built.certs / "kafka"
    old_key, old_crt = (k / "ca.key").read_bytes(), (k / "ca.crt").read_bytes()
    real_replace = os.replace

    def stop_at_ca_crt(src, dst):
        if Path(dst) == k / "ca.crt":      # the stage's commit renames the key first
            raise KeyboardInterrupt
        return real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(contract.os, "replace", stop_at_ca_crt)
        with pytest.raises(KeyboardInterrupt):
            build_certs(default_lab, built, rotate=("kafka",))
    assert (k / "ca.key").read_bytes() != old_key and (k / "ca.crt").read_bytes() == old_crt
    before = tree_snapshot(built.certs, mtimes=True)
    with pytest.raises(LabError, match=r"ca.key: this key does not belong to ca.crt "
                                       r"\(an interrupted rotation\?\).*--rotate kafka"):
        build_certs(default_lab, built)
    assert changed(before, tree_snapshot(built.certs, mtimes=True)) == set()
    build_certs(default_lab, built, rotate=("kafka",))
    ca = x509.load_pem_x509_certificate((k / "ca.crt").read_bytes())
    assert pki.same_public_key(serialization.load_pem_private_key((k / "ca.key").read_bytes(),
                                                                  None), ca)
