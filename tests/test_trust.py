"""Trust checks that are not one CLI fault each: the run dependencies need no
compiler, a keystore needs no twofish, progress goes to stderr, certs/ is
never left open, the lab's output names and file-valued keys are checked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from builders.core import lab as labmod
from builders.core.errors import LabError
from helpers import LOCKS, ROOT, lab_file, plain_host


# --------------------------------------------------------------------------
# progress on stderr
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_progress_bar_goes_to_stderr(tmp_path):
    """With stderr a terminal and stdout a pipe, the bar is drawn on the
    terminal and stdout stays empty (rich's default console is stdout)."""
    import pty
    script = textwrap.dedent("""
        from builders.core.console import progress
        with progress("copy", total=100) as p:
            for _ in range(10):
                p.advance(10)
    """)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, "TERM": "xterm", "COLUMNS": "80"})
    os.close(slave)
    out, _ = proc.communicate(timeout=60)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.returncode == 0
    assert out == b"", out
    assert b"copy" in seen


# --------------------------------------------------------------------------
# certs/ is private from its first moment
# --------------------------------------------------------------------------
def test_certs_dir_private_after_interrupted_first_run(tmp_path, default_lab, monkeypatch):
    """An interrupt while the first files are written leaves certs/ 0700."""
    from builders.artifacts import certs as certsmod
    from builders.core import contract
    from builders.core.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    os.umask(0o022)
    calls = []

    def interrupted(self, path, *args, **kwargs):     # Ctrl-C on the first write
        calls.append(path)
        raise KeyboardInterrupt
    monkeypatch.setattr(contract.Stage, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        certsmod.build_certs(default_lab, ws)
    assert calls
    assert (ws.certs.stat().st_mode & 0o777) == 0o700
    for d in ws.certs.rglob("*"):
        if d.is_dir():
            assert (d.stat().st_mode & 0o777) == 0o700, d


def test_private_dir_narrows_an_open_certs_dir(tmp_path):
    from builders.core.workspace import Workspace
    ws = Workspace(tmp_path / "ws")
    ws.certs.mkdir(parents=True, mode=0o755)
    os.chmod(ws.certs, 0o755)
    ws.certs_dir("kafka")
    assert (ws.certs.stat().st_mode & 0o777) == 0o700
    assert ((ws.certs / "kafka").stat().st_mode & 0o777) == 0o700


# --------------------------------------------------------------------------
# output names: the lab's list is the builders' list
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_output_names_cover_what_the_builders_write(tmp_path, ws, cli, default_lab):
    """Every file `certs` and `seed-iso` write for the default lab is in
    lab.outputs(), so the collision check sees every output name."""
    assert cli("certs").returncode == 0
    assert cli("seed-iso").returncode == 0
    known = {p for p, _ in labmod.outputs(default_lab)}
    written = set()
    for sub in ("certs/kafka", "certs/octavia", "certs/ssh", "certs/seed", "artifacts/seed"):
        d = ws.root / sub
        if d.is_dir():
            written |= {f"{sub}/{p.name}" for p in d.iterdir()
                        if p.is_file() and p.name not in LOCKS}
    assert written and written <= known, sorted(written - known)


def test_outputs_collide_for_every_kind():
    """One colliding name per kind of output is refused at validation."""
    base = {"networks": {"private": {"cidr": "10.100.0.0/24"}}}
    for hosts, needle in (
            ({"ca": {"ip": "10.100.0.2", "roles": ["kafka-broker"]}}, "certs/kafka/ca.crt"),
            ({"net-private": {"ip": "10.100.0.2"}}, "artifacts/libvirt/net-private.xml"),
            ({"a": {"ip": "10.100.0.2"}, "a-volume": {"ip": "10.100.0.3"}},
             "artifacts/libvirt/a-volume.xml")):
        with pytest.raises(LabError) as err:
            labmod.from_dict({**base, "hosts": hosts})
        assert needle in str(err.value)


# --------------------------------------------------------------------------
# cloud-init's schema, from the package (not installed)
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_cloudinit_schema_from_the_package(tmp_path):
    from builders.tools import cloudinit_schema as cis
    distro, codename = cis.host_release()
    schema, version = cis.load_schema(tmp_path, distro, codename)
    assert version and (cis.schema_dir(tmp_path, distro, codename) / cis.CLOUD_CONFIG).is_file()
    cis.validate({"packages": ["curl"], "runcmd": ["true"],
                  "write_files": [{"path": "/x", "content": b"bytes", "permissions": "0644"}]},
                 schema, "user-data", version)
    for doc, needle in (({"packages": 5}, "packages: 5 is not of type 'array'"),
                        ({"write_files": [{"path": "/x", "permissions": 420}]},
                         "write_files.0.permissions"),
                        ({"power_state": {"mode": "off"}}, "power_state.mode")):
        with pytest.raises(LabError) as err:
            cis.validate(doc, schema, "user-data", version)
        assert needle in str(err.value) and "cloud-init" in str(err.value)

    # the schema cut to a document's keys judges it as the whole schema does
    from jsonschema import Draft4Validator
    from jsonschema.exceptions import best_match
    full = Draft4Validator(schema)
    for doc in ({"packages": 5}, {"packages": ["x"], "runcmd": [["ls", 1]], "users": "x"},
                {"write_files": [{"path": "/x", "permissions": 420}], "ssh_pwauth": "maybe"},
                {"hostname": "h", "fqdn": 3, "manage_etc_hosts": "sure", "unknown_key": 1},
                {"apt": {"sources": 1}, "bootcmd": "x"}):
        cut = cis.for_keys(schema, frozenset(doc))
        assert len(cut["allOf"]) < len(schema["allOf"]) / 2
        want = sorted((list(e.absolute_path), e.message) for e in full.iter_errors(doc))
        got = sorted((list(e.absolute_path), e.message)
                     for e in Draft4Validator(cut).iter_errors(doc))
        assert want and got == want, (doc, want, got)
        assert best_match(Draft4Validator(cut).iter_errors(doc)).message == \
            best_match(full.iter_errors(doc)).message


# --------------------------------------------------------------------------
# secrets never reach artifacts/
# --------------------------------------------------------------------------
def test_secret_scan_finds_keys_in_base64_and_plain(tmp_path):
    """The scanner itself: a key in plain text, one base64-encoded inside a
    user-data file, a password; and nothing in a clean file."""
    import base64
    from secret_scan import scan
    key = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    (tmp_path / "plain.txt").write_bytes(b"x" * 100 + key)
    (tmp_path / "user-data").write_bytes(b"#cloud-config\nwrite_files:\n- content: "
                                         + base64.b64encode(key * 2) + b"\n  encoding: b64\n")
    (tmp_path / "props").write_text("ssl.keystore.password=Sup3r-Secret-pw\n")
    (tmp_path / "clean.txt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    found = scan(tmp_path, ["Sup3r-Secret-pw"])
    assert any(f.startswith("plain.txt: a PEM/OpenSSH private key") for f in found), found
    assert any(f.startswith("user-data:") and "(base64)" in f for f in found), found
    assert "props: a lab secret" in found
    assert not [f for f in found if f.startswith("clean.txt")]


@pytest.mark.integration
def test_public_artifacts_hold_no_secrets(tmp_path, ws, cli):
    """A lab whose brokers' seeds carry keystores from certs/ (secret seeds,
    under certs/seed/) and whose web host's seed is public: artifacts/ holds
    no private key, keystore or secret of the lab."""
    from secret_scan import scan, secrets_of
    lab = lab_file(tmp_path, **{"hosts.web": plain_host(30), "hosts.broker1": {
        "write_files": [{"path": "/etc/kafka/ssl/broker1.keystore.p12",
                         "source": "certs:kafka/broker1.keystore.p12", "permissions": "0600"},
                        {"path": "/etc/kafka/ssl/broker1.key", "source": "certs:kafka/broker1.key",
                         "permissions": "0600"}]}})
    for task in ("certs", "seed-iso", "vagrantfile"):
        proc = cli(task, "--lab", str(lab))
        assert proc.returncode == 0, proc.stderr
    assert cli("seed-iso", "--lab", str(lab), "--format", "vfat").returncode == 0
    assert (ws.certs / "seed" / "broker1.iso").is_file()
    assert (ws.certs / "seed" / "broker2.iso").is_file()      # its Kafka keystores
    assert (ws.artifacts / "seed" / "web.iso").is_file()
    secrets = secrets_of(ws.certs)
    assert len(secrets) >= 2
    assert scan(ws.artifacts, secrets) == []
    # and the scanner does see them where they are
    assert scan(ws.certs / "seed", secrets)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["hard-link-to-other-ca-key", "private-key-file", "inline-key",
                                 "hard-link-plain-file"])
def test_key_material_makes_the_seed_secret(tmp_path, ws, cli, how):
    """A seed carrying key material (by content, or a hard link whose other
    name may be a key) goes to certs/seed/, never to artifacts/."""
    from secret_scan import scan
    other = tmp_path / "other-ws"
    assert cli("certs", env={"LABFORGE_WORKDIR": str(other)}).returncode == 0
    assert cli("certs").returncode == 0
    labdir = tmp_path / "labdir"
    labdir.mkdir()
    wf = {"path": "/etc/x", "permissions": "0600"}
    if how == "hard-link-to-other-ca-key":
        os.link(other / "certs" / "kafka" / "ca.key", labdir / "innocent.txt")
        wf["source"] = "innocent.txt"
    elif how == "private-key-file":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(labdir / "id_ed25519")], check=True)
        wf["source"] = "id_ed25519"
    elif how == "inline-key":
        wf["content"] = (other / "certs" / "kafka" / "broker1.key").read_text()
    else:
        (tmp_path / "plain.txt").write_text("hello\n")
        os.link(tmp_path / "plain.txt", labdir / "plain.txt")
        wf["source"] = "plain.txt"
    lab = lab_file(labdir, **{"hosts.broker1": {"write_files": [wf]}})
    proc = cli("seed-iso", "--lab", str(lab))
    assert proc.returncode == 0, proc.stderr
    assert (ws.certs / "seed" / "broker1.iso").is_file()
    assert not (ws.artifacts / "seed" / "broker1.iso").exists()
    assert scan(ws.artifacts, []) == []
