"""The certificates as the real tools see them: openssl, keytool, a JVM, Python ssl,
ssh-keygen, and `invoke certs` / `invoke certs-check` as a user runs them."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from builders.artifacts.certs import build_certs
from builders.core.workspace import Workspace

from helpers import assert_one_line_error, changed, lab_file, sh, tree_snapshot

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent / "data"
KAFKA_IDS = ("broker1", "broker2", "broker3", "kafka-client")


@pytest.fixture(scope="module")
def lab_ws(tmp_path_factory) -> Workspace:
    """The default lab's certs, built once for the read-only checks below."""
    from builders.core import lab as labmod
    ws = Workspace(tmp_path_factory.mktemp("certs") / "ws")
    build_certs(labmod.load(), ws)
    return ws


@pytest.fixture(scope="module")
def other_ws(tmp_path_factory) -> Workspace:
    """A second lab with its own CAs: its certificates must be refused."""
    from builders.core import lab as labmod
    ws = Workspace(tmp_path_factory.mktemp("other") / "ws")
    build_certs(labmod.load(), ws)
    return ws


# --------------------------------------------------------------------------
# openssl
# --------------------------------------------------------------------------
def test_openssl_verifies_every_leaf(lab_ws):
    k = lab_ws.certs / "kafka"
    out = sh("openssl", "verify", "-CAfile", k / "ca.crt", *[k / f"{n}.crt" for n in KAFKA_IDS])
    assert out.stdout.count(": OK") == 4
    # the chain files verify too, with only the CA as trust anchor
    for n in KAFKA_IDS:
        sh("openssl", "verify", "-CAfile", k / "ca.crt", k / f"{n}-chain.pem")
    o = lab_ws.certs / "octavia"
    sh("openssl", "verify", "-CAfile", o / "client_ca.cert.pem", o / "client.cert-and-key.pem")
    # ... and not by the other CA
    bad = sh("openssl", "verify", "-CAfile", o / "server_ca.cert.pem",
             o / "client.cert-and-key.pem", check=False)
    assert bad.returncode != 0


def test_openssl_verifies_an_amphora_cert(lab_ws, tmp_path):
    from builders.core import lab as labmod
    from builders.artifacts.certs import issue_amphora_cert
    cert, key = issue_amphora_cert(labmod.load(), lab_ws, "amphora-1234")
    (tmp_path / "amp.pem").write_bytes(cert)
    (tmp_path / "amp.key").write_bytes(key)
    o = lab_ws.certs / "octavia"
    sh("openssl", "verify", "-CAfile", o / "server_ca-chain.cert.pem", "-purpose", "sslserver",
       tmp_path / "amp.pem")
    sh("openssl", "pkey", "-in", tmp_path / "amp.key", "-noout")
    text = sh("openssl", "x509", "-noout", "-text", "-in", tmp_path / "amp.pem").stdout
    assert "DNS:amphora-1234" in text


def test_openssl_text_shows_sans_and_ekus(lab_ws):
    k = lab_ws.certs / "kafka"
    text = sh("openssl", "x509", "-noout", "-text", "-in", k / "broker3.crt").stdout
    assert ("DNS:broker3, DNS:broker3.lab.internal, IP Address:192.168.100.13, "
            "IP Address:10.100.0.13") in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text and "sha256WithRSAEncryption" in text
    assert "Public-Key: (2048 bit)" in text
    text = sh("openssl", "x509", "-noout", "-text", "-in", k / "kafka-client.crt").stdout
    assert "TLS Web Client Authentication" in text and "Server Authentication" not in text
    text = sh("openssl", "x509", "-noout", "-text", "-in", k / "ca.crt").stdout
    assert "CA:TRUE, pathlen:0" in text and "Certificate Sign, CRL Sign" in text


def test_openssl_opens_the_pkcs12_stores(lab_ws):
    k = lab_ws.certs / "kafka"
    for n in (*[f"{i}.keystore.p12" for i in KAFKA_IDS], "truststore.p12"):
        sh("openssl", "pkcs12", "-in", k / n, "-passin", f"file:{k / 'store.password'}",
           "-noout")


def test_octavia_ca_key_opens_only_with_its_passphrase(lab_ws, tmp_path):
    o = lab_ws.certs / "octavia"
    sh("openssl", "pkey", "-in", o / "server_ca.key.pem", "-passin",
       f"file:{o / 'ca_private_key_passphrase'}", "-noout")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-passphrase\n")
    bad = sh("openssl", "pkey", "-in", o / "server_ca.key.pem", "-passin", f"file:{wrong}",
             "-noout", check=False)
    assert bad.returncode != 0
    # the combined client file loads as a key and as a certificate
    sh("openssl", "pkey", "-in", o / "client.cert-and-key.pem", "-noout")
    sh("openssl", "x509", "-in", o / "client.cert-and-key.pem", "-noout")


# --------------------------------------------------------------------------
# keytool
# --------------------------------------------------------------------------
def keytool_list(store: Path, password_file: Path) -> str:
    return sh("keytool", "-list", "-v", "-keystore", store,
              "-storepass:file", password_file).stdout


@pytest.mark.parametrize("ext", ["p12", "jks"])
def test_keytool_lists_keystores_and_truststores(lab_ws, ext):
    k = lab_ws.certs / "kafka"
    pw = k / "store.password"
    for n in KAFKA_IDS:
        out = keytool_list(k / f"{n}.keystore.{ext}", pw)
        assert "Your keystore contains 1 entry" in out, out
        assert f"Alias name: {n}" in out
        assert "Entry type: PrivateKeyEntry" in out
        assert "Certificate chain length: 2" in out
    out = keytool_list(k / f"truststore.{ext}", pw)
    assert "Your keystore contains 1 entry" in out, out
    assert "Entry type: trustedCertEntry" in out
    assert "Keystore type: " + ("PKCS12" if ext == "p12" else "JKS") in out


def test_the_jvm_decrypts_the_jks_key_labforge_wrote(lab_ws, tmp_path):
    """labforge writes JKS itself: keytool takes the private key out of the
    JKS with the store password (into a PKCS#12), and it is broker1.key."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12
    k = lab_ws.certs / "kafka"
    out = tmp_path / "out.p12"
    sh("keytool", "-importkeystore", "-noprompt", "-srckeystore", k / "broker1.keystore.jks",
       "-srcstorepass:file", k / "store.password", "-srckeypass:file", k / "store.password",
       "-srcalias", "broker1", "-destkeystore", out, "-deststoretype", "PKCS12",
       "-deststorepass", "exported", "-destkeypass", "exported")
    got = pkcs12.load_key_and_certificates(out.read_bytes(), b"exported")
    want = load_pem_private_key((k / "broker1.key").read_bytes(), None)
    assert got[0].private_numbers() == want.private_numbers()
    assert got[1].subject.rfc4514_string().startswith("CN=broker1.")


def test_labforge_reads_the_jks_keytool_wrote(lab_ws, tmp_path):
    """certs-check reads JKS itself: a keystore keytool writes (from the
    broker's PKCS#12) opens to broker1.key and its chain, and a truststore
    keytool writes holds the CA; a wrong password is refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from builders.tools import pki
    k = lab_ws.certs / "kafka"
    pw = (k / "store.password").read_text().strip()
    jks, trust = tmp_path / "k.jks", tmp_path / "t.jks"
    sh("keytool", "-importkeystore", "-noprompt", "-srckeystore", k / "broker1.keystore.p12",
       "-srcstoretype", "PKCS12", "-srcstorepass:file", k / "store.password",
       "-destkeystore", jks, "-deststoretype", "JKS",
       "-deststorepass:file", k / "store.password", "-destkeypass:file", k / "store.password")
    sh("keytool", "-importcert", "-noprompt", "-alias", "labca", "-file", k / "ca.crt",
       "-keystore", trust, "-storetype", "JKS", "-storepass:file", k / "store.password")
    store = pki.open_jks(jks.read_bytes(), pw)
    pkcs8, chain = store.keys["broker1"]
    want = serialization.load_pem_private_key((k / "broker1.key").read_bytes(), None)
    assert serialization.load_der_private_key(pkcs8, None).private_numbers() == \
        want.private_numbers()
    assert len(chain) == 2
    assert pki.open_jks(trust.read_bytes(), pw).certs["labca"] == \
        x509.load_pem_x509_certificate((k / "ca.crt").read_bytes()).public_bytes(pki.DER)
    with pytest.raises(ValueError):
        pki.open_jks(jks.read_bytes(), pw + "x")


# --------------------------------------------------------------------------
# mutual TLS: a JVM, and Python ssl
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_java(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("java")
    sh("javac", "-d", out, DATA / "MtlsCheck.java")
    return out


def run_java(classes: Path, server: Workspace, client: Workspace, ext: str,
             broker="broker1", server_name="broker1.lab.internal") -> subprocess.CompletedProcess:
    sk, ck = server.certs / "kafka", client.certs / "kafka"
    spw, cpw = sk / "store.password", ck / "store.password"
    return sh("java", "-cp", classes, "MtlsCheck",
              sk / f"{broker}.keystore.{ext}", spw, sk / f"truststore.{ext}", spw,
              ck / f"kafka-client.keystore.{ext}", cpw, sk / f"truststore.{ext}", spw,
              server_name, check=False)


@pytest.mark.parametrize("ext", ["jks", "p12"])
def test_java_mutual_tls(lab_ws, mtls_java, ext):
    proc = run_java(mtls_java, lab_ws, lab_ws, ext)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server: OK peer=CN=kafka-client" in proc.stdout
    assert "client: OK peer=CN=broker1.lab.internal" in proc.stdout


def test_java_refuses_a_client_of_another_ca(lab_ws, other_ws, mtls_java):
    proc = run_java(mtls_java, lab_ws, other_ws, "jks")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "server: FAIL" in proc.stdout and "client: FAIL" in proc.stdout


def test_java_checks_the_broker_name(lab_ws, mtls_java):
    proc = run_java(mtls_java, lab_ws, lab_ws, "jks", server_name="broker2.lab.internal")
    assert proc.returncode == 3 and "client: FAIL" in proc.stdout, proc.stdout


def python_mtls(server: Workspace, client: Workspace, server_name="broker1") -> tuple[str, str]:
    """One exchange over loopback; returns (server result, client result)."""
    sk, ck = server.certs / "kafka", client.certs / "kafka"
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(sk / "broker1-chain.pem", sk / "broker1.key")
    sctx.load_verify_locations(sk / "ca.crt")
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.create_default_context(cafile=str(sk / "ca.crt"))
    cctx.load_cert_chain(ck / "client-bundle.pem")      # cert + CA + key in one file
    result = {}
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(30)
        port = lsock.getsockname()[1]

        def serve():
            try:
                conn, _ = lsock.accept()
                conn.settimeout(30)
                with sctx.wrap_socket(conn, server_side=True) as s:
                    peer = dict(x[0] for x in s.getpeercert()["subject"])
                    s.sendall(b"echo " + s.recv(64))
                    result["server"] = f"OK peer={peer['commonName']}"
            except (OSError, ssl.SSLError) as exc:
                result["server"] = f"FAIL {exc}"

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                    cctx.wrap_socket(raw, server_hostname=server_name) as s:
                s.sendall(b"hello")
                reply = s.recv(64)
                result["client"] = "OK" if reply == b"echo hello" else f"FAIL reply {reply!r}"
        except (OSError, ssl.SSLError) as exc:
            result["client"] = f"FAIL {exc}"
        t.join(30)
    return result.get("server", "FAIL no result"), result["client"]


def test_python_mutual_tls(lab_ws):
    server, client = python_mtls(lab_ws, lab_ws)
    assert server == "OK peer=kafka-client" and client == "OK", (server, client)


def test_python_refuses_a_client_of_another_ca(lab_ws, other_ws):
    server, client = python_mtls(lab_ws, other_ws)
    assert server.startswith("FAIL") and "certificate" in server.lower(), server


# --------------------------------------------------------------------------
# SSH keys
# --------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["ssh/lab_ed25519", "octavia/octavia_ssh_key"])
def test_ssh_keygen_reads_the_keys(lab_ws, rel):
    priv = lab_ws.certs / rel
    derived = sh("ssh-keygen", "-y", "-f", priv).stdout.split()[:2]
    assert derived == Path(f"{priv}.pub").read_text().split()[:2]
    assert "(ED25519)" in sh("ssh-keygen", "-l", "-f", f"{priv}.pub").stdout


# --------------------------------------------------------------------------
# the CLI: good and bad input
# --------------------------------------------------------------------------
def test_cli_certs_and_check(cli, ws):
    first = cli("certs", check=True)
    assert "certs kafka: built" in first.stdout
    before = tree_snapshot(ws.certs, mtimes=True)
    again = cli("certs", check=True)
    assert again.stdout.count("up to date") == 3, again.stdout
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()
    ok = cli("certs-check", check=True)
    assert "kafka/broker1.crt: CN=broker1.lab.internal" in ok.stdout
    assert "IP:10.100.0.11" in ok.stdout and "days left: ok" in ok.stdout
    warn = cli("certs-check", "--warn-days", "900")
    assert_one_line_error(warn, "certs-check:", "certificates have problems")
    assert "expires within 900 days" in warn.stdout
    # nothing secret on the terminal
    pw = (ws.certs / "kafka" / "store.password").read_text().strip()
    assert pw not in first.stdout + first.stderr + ok.stdout


def test_cli_renews_an_expiring_leaf(cli, ws, monkeypatch):
    """certs-check's hint works: `invoke certs` renews leaves near their end under the same CA."""
    import datetime
    from builders.core import lab as labmod
    from builders.tools import pki
    then = pki._now() - datetime.timedelta(days=800)       # 825-day leaves: 25 days left
    with monkeypatch.context() as m:
        m.setattr(pki, "_now", lambda: then)
        build_certs(labmod.load(), ws)
    k = ws.certs / "kafka"
    ca = (k / "ca.crt").read_bytes()
    warn = cli("certs-check")
    assert_one_line_error(warn, "expires within 30 days",
                          "run `invoke certs` to renew the expiring leaves")
    proc = cli("certs", check=True)
    assert "certs kafka: built (renewed broker1 (24 days left)" in proc.stdout, proc.stdout
    assert "renewed controller client certificate" in proc.stdout
    assert (k / "ca.crt").read_bytes() == ca
    out = sh("openssl", "verify", "-CAfile", k / "ca.crt", *[k / f"{n}.crt" for n in KAFKA_IDS])
    assert out.stdout.count(": OK") == 4
    o = ws.certs / "octavia"
    sh("openssl", "verify", "-CAfile", o / "client_ca.cert.pem", o / "client.cert-and-key.pem")
    assert "chain length: 2" in keytool_list(k / "broker1.keystore.jks", k / "store.password")
    cli("certs-check", check=True)
    assert cli("certs", check=True).stdout.count("up to date") == 3


def test_cli_wrong_store_password_file(cli, ws, tmp_path):
    pwf = tmp_path / "store-pw.txt"
    pwf.write_text("first-password-123\n")
    lab = lab_file(tmp_path / "lab", **{"kafka.password_file": str(pwf)})
    cli("certs", "--lab", str(lab), check=True)
    assert (ws.certs / "kafka" / "store.password").read_text() == "first-password-123\n"
    before = tree_snapshot(ws.certs, mtimes=True)
    pwf.write_text("another-password-456\n")
    proc = cli("certs", "--lab", str(lab))
    assert_one_line_error(proc, "keystore", "does not open this keystore", "--force")
    assert "another-password" not in proc.stderr + proc.stdout
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()
    # unreadable: the password file is a directory; missing
    pwf.unlink()
    pwf.mkdir()
    assert_one_line_error(cli("certs", "--lab", str(lab)), "kafka.password_file", "is a directory")
    pwf.rmdir()
    assert_one_line_error(cli("certs", "--lab", str(lab)), "kafka.password_file", "does not exist")
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()
    # deliberately switching the password: --force re-issues the stores with it
    pwf.write_text("another-password-456\n")
    cli("certs", "--lab", str(lab), "--force", check=True)
    assert keytool_list(ws.certs / "kafka" / "truststore.jks", pwf)


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_cli_unreadable_ca_key(cli, ws, damage):
    cli("certs", check=True)
    key = ws.certs / "kafka" / "ca.key"
    if damage == "garbage":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    else:
        key.unlink()
        key.mkdir()
    before = tree_snapshot(ws.certs, mtimes=True)
    proc = cli("certs")
    assert_one_line_error(proc, "ca.key", "--rotate kafka")
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()


def test_cli_bad_ip_in_lab(cli, ws, tmp_path):
    cli("certs", check=True)
    before = tree_snapshot(ws.certs, mtimes=True)
    for ip, needle in (("10.200.0.12", "lab.yaml: hosts.broker2.ip: 10.200.0.12 is not in "
                                       "network private (10.100.0.0/24)"),
                       ("10.100.0.300", "lab.yaml: hosts.broker2.ip: '10.100.0.300' is not an "
                                        "IPv4 address")):
        lab = lab_file(tmp_path / ip, **{"hosts.broker2.ip": ip})
        assert_one_line_error(cli("certs", "--lab", str(lab)), needle)
    assert changed(before, tree_snapshot(ws.certs, mtimes=True)) == set()


def test_cli_rotate_unknown_set(cli):
    assert_one_line_error(cli("certs", "--rotate", "nope"), "--rotate", "kafka, octavia, ssh")


def test_cli_check_without_certs(cli):
    assert_one_line_error(cli("certs-check"), "run `invoke certs` first")


@pytest.fixture(autouse=True, scope="module")
def _tools():
    for tool in ("openssl", "keytool", "java", "javac", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} missing: run scripts/setup.sh --test"
