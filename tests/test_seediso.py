"""seed-iso: NoCloud seeds built with pycdlib, checked with the real ISO tools."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from builders.core import lab as labmod
import builders.artifacts.seed as seeds
from builders.core import contract
from builders.artifacts.seed import rendering, validate
from builders.core.errors import LabError
from builders.core.fsutil import sha256_file
from builders.core.manifest import Manifest, SecretLedger
from builders.artifacts.seed import build_seed_isos, read_seed, seed_marker, seed_path
from builders.core.workspace import Workspace

from helpers import assert_one_line_error, lab_file, write_lab


def make_pubkey(path: Path, comment: str = "labforge") -> str:
    """An ed25519 public key in OpenSSH format (what `invoke certs` writes)."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode() + f" {comment}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")
    return line


@pytest.fixture
def lab_key(ws: Workspace) -> str:
    return make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")


LAB = """\
name: seedlab
domain: lab.test
networks:
  private: {cidr: 10.100.0.0/24, gateway: 10.100.0.1}
hosts:
  broker1:
    ip: 10.100.0.11
    mac: "52:54:00:64:00:0b"
    packages: [openjdk-17-jre-headless]
    runcmd: ["echo hello > /tmp/hello"]
    write_files:
      - {path: /etc/labforge/hello.txt, content: "hello broker1\\n", permissions: "0640"}
  broker2:
    ip: 10.100.0.12
"""


def test_default_lab_seeds_show_the_names_tools_expect(default_lab, ws, lab_key):
    outcomes = build_seed_isos(default_lab, ws)
    assert [o.status for o in outcomes] == ["built"] * len(default_lab.hosts)
    iso = ws.artifacts / "seed" / "broker1.iso"
    assert seed_path(default_lab, ws, "broker1") == iso
    names = sorted(read_seed(iso))
    assert names == ["meta-data", "network-config", "user-data"]
    # the builder's declared outputs are exactly what it recorded
    declared = seeds.SEEDS.outputs(default_lab, ws)
    assert [o.path for o in declared] == [p for o in outcomes for p in o.paths]
    m = Manifest(ws.artifacts)
    assert all(m.get(o.path)["kind"] == o.kind == "seed-iso" for o in declared)
    assert seeds.SEEDS.ready(default_lab, ws) is None
    iso.unlink()
    assert seeds.SEEDS.ready(default_lab, ws) == "there is no seed for broker1"


@pytest.mark.integration
def test_xorriso_isoinfo_blkid_see_a_cidata_volume(tmp_path, ws, lab_key):
    """The default lab, with vendor-data on broker1: xorriso and isoinfo (Rock
    Ridge and Joliet) show exactly the four names; broker2 has the three."""
    (tmp_path / "vendor.yaml").write_text("#cloud-config\npackages: [jq]\n")
    lab = labmod.load(lab_file(tmp_path, **{"hosts.broker1.vendor_data": "vendor.yaml"}))
    build_seed_isos(lab, ws, hosts=["broker1", "broker2"])
    four = ["meta-data", "network-config", "user-data", "vendor-data"]
    for host, names in (("broker1", four), ("broker2", [n for n in four if n != "vendor-data"])):
        iso = ws.artifacts / "seed" / f"{host}.iso"
        xo = subprocess.run(["xorriso", "-indev", str(iso), "-ls", "/"], capture_output=True,
                            text=True, check=True)
        assert xo.stdout.split() == [f"'{n}'" for n in names]
        assert "Volume id    : 'cidata'" in xo.stderr
        rr = subprocess.run(["isoinfo", "-R", "-l", "-i", str(iso)], capture_output=True,
                            text=True, check=True).stdout
        jo = subprocess.run(["isoinfo", "-J", "-l", "-i", str(iso)], capture_output=True,
                            text=True, check=True).stdout
        for listing in (rr, jo):
            files = [ln.split()[-1] for ln in listing.splitlines() if ln.startswith("-")]
            assert files == names
        info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True,
                              text=True, check=True).stdout
        assert "Volume id: cidata" in info and "Rock Ridge" in info and "Joliet" in info
        bl = subprocess.run(["blkid", "-o", "export", str(iso)], capture_output=True,
                            text=True, check=True).stdout
        assert "LABEL=cidata" in bl.split() and "TYPE=iso9660" in bl.split()


@pytest.mark.integration
def test_contents_round_trip_through_xorriso(tmp_path, ws, lab_key):
    lab = labmod.load(write_lab(tmp_path, LAB))
    build_seed_isos(lab, ws)
    iso = ws.artifacts / "seed" / "broker1.iso"
    out = tmp_path / "extract"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)],
                   check=True, capture_output=True)
    # against what labforge rendered, not pycdlib reading back what it wrote
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        seeds.render(lab, ws, "broker1").files
    meta = yaml.safe_load((out / "meta-data").read_text())
    ud_text = (out / "user-data").read_text()
    assert ud_text.startswith("#cloud-config\n")
    ud = yaml.safe_load(ud_text)
    net = yaml.safe_load((out / "network-config").read_text())
    marker = seed_marker(lab, "broker1", ws)
    assert marker == f"labforge-seed-ok broker1 {meta['instance-id']}"
    assert meta["local-hostname"] == "broker1" and meta["instance-id"].startswith("iid-broker1-")
    assert ud["hostname"] == "broker1" and ud["fqdn"] == "broker1.lab.test"
    # /etc/hosts names every lab host (cloud-init's would map broker1 to 127.0.1.1)
    assert ud["manage_etc_hosts"] is False
    hosts = base64.b64decode(next(w["content"] for w in ud["write_files"]
                                  if w["path"] == "/etc/hosts")).decode()
    assert "10.100.0.12\tbroker2.lab.test broker2" in hosts and "127.0.1.1" not in hosts
    assert ud["user"]["name"] == "debian" and ud["ssh_authorized_keys"] == [lab_key]
    assert ud["packages"] == ["openjdk-17-jre-headless"]
    assert ud["runcmd"][0] == "echo hello > /tmp/hello"
    assert marker in ud["runcmd"][-1][-1] and "/dev/ttyS0" in ud["runcmd"][-1][-1]
    wf = ud["write_files"][0]
    assert base64.b64decode(wf["content"]) == b"hello broker1\n"
    assert (wf["path"], wf["owner"], wf["permissions"], wf["encoding"]) == \
        ("/etc/labforge/hello.txt", "root:root", "0640", "b64")
    eth = net["ethernets"]
    assert net["version"] == 2
    assert eth["lab0"]["match"] == {"macaddress": "52:54:00:64:00:0b"}
    assert eth["lab0"]["addresses"] == ["10.100.0.11/24"] and "routes" not in eth["lab0"]
    assert eth["eth0"] == {"dhcp4": True}
    # broker2 has no MAC: the lab NIC is named eth1, DHCP stays on eth0
    net2 = yaml.safe_load(read_seed(ws.artifacts / "seed" / "broker2.iso")["network-config"])
    assert net2["ethernets"]["eth1"]["addresses"] == ["10.100.0.12/24"]
    assert net2["ethernets"]["eth0"] == {"dhcp4": True}


def test_same_seed_twice_is_byte_identical(tmp_path, default_lab, lab_key):
    ws = Workspace(tmp_path / "ws")
    build_seed_isos(default_lab, ws, hosts=["broker2"])
    first = (ws.artifacts / "seed" / "broker2.iso").read_bytes()
    ws2 = Workspace(tmp_path / "ws2")
    shutil.copytree(ws.certs, ws2.certs)
    build_seed_isos(default_lab, ws2, hosts=["broker2"])
    assert (ws2.artifacts / "seed" / "broker2.iso").read_bytes() == first
    # and --force rewrites the same bytes
    build_seed_isos(default_lab, ws, hosts=["broker2"], force=True)
    assert (ws.artifacts / "seed" / "broker2.iso").read_bytes() == first


def test_source_date_epoch_sets_the_dates(default_lab, ws, lab_key, monkeypatch):
    build_seed_isos(default_lab, ws, hosts=["broker1"])
    iso = ws.artifacts / "seed" / "broker1.iso"
    before = iso.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    (o,) = build_seed_isos(default_lab, ws, hosts=["broker1"])
    assert o.status == "built" and iso.read_bytes() != before
    assert b"2023111422132000" in iso.read_bytes()      # 2023-11-14T22:13:20Z, UTC


def test_second_run_is_up_to_date_and_recorded(default_lab, ws, lab_key):
    build_seed_isos(default_lab, ws)
    again = build_seed_isos(default_lab, ws)
    assert {o.status for o in again} == {"up to date"}
    rec = Manifest(ws.artifacts).get("seed/broker1.iso")
    assert rec["kind"] == "seed-iso" and rec["meta"]["host"] == "broker1"
    assert rec["meta"]["instance_id"].startswith("iid-broker1-")
    # a changed input is a new instance
    make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")
    (o, *_) = build_seed_isos(default_lab, ws)
    assert o.status == "built"
    assert Manifest(ws.artifacts).get("seed/broker1.iso")["meta"]["instance_id"] != \
        rec["meta"]["instance_id"]


def test_a_seed_with_certs_material_is_secret(tmp_path, ws, lab_key):
    jks = ws.certs_dir("kafka") / "broker1.keystore.jks"
    jks.write_bytes(b"\xfe\xed\xfe\xed secret keystore")
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        '      - {path: /etc/labforge/hello.txt',
        '      - {path: /etc/kafka/ssl/broker1.keystore.jks, source: "certs:kafka/broker1.keystore.jks",'
        ' owner: "kafka:kafka", permissions: "0600"}\n'
        '      - {path: /etc/labforge/hello.txt')))
    (o1, o2) = build_seed_isos(lab, ws)
    secret = ws.certs / "seed" / "broker1.iso"
    assert seed_path(lab, ws, "broker1") == secret and o1.paths == [secret]
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.parent.stat().st_mode & 0o777 == 0o700
    assert not (ws.artifacts / "seed" / "broker1.iso").exists()
    entries = Manifest(ws.artifacts).entries()
    assert "seed/broker1.iso" not in entries and "seed/broker2.iso" in entries
    assert b"kafka" not in (ws.artifacts / "manifest.json").read_bytes()
    ud = yaml.safe_load(read_seed(secret)["user-data"])
    wf = ud["write_files"][0]
    assert base64.b64decode(wf["content"]) == jks.read_bytes()
    assert wf["owner"] == "kafka:kafka" and wf["defer"] is True
    rec = SecretLedger(ws.certs / "seed").get("broker1.iso")
    assert rec["sha256"] == sha256_file(secret) and rec["meta"]["host"] == "broker1"
    assert (ws.certs / "seed" / "ledger.json").stat().st_mode & 0o777 == 0o600
    assert build_seed_isos(lab, ws, hosts=["broker1"])[0].status == "up to date"


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "user_data",
                                 "network_config", "vendor_data"])
def test_any_file_from_certs_makes_the_seed_secret(ws, lab_key, how):
    """Not only `certs:` sources: any path that resolves under the workspace's
    certs/ (relative to a lab file in the workspace, absolute, through a
    symlink, or a host's own user-data/network-config/vendor-data there)
    keeps the seed out of artifacts/ and the manifest."""
    kafka = ws.certs_dir("kafka")
    secret_bytes = b"\xfe\xed\xfe\xed secret keystore"
    (kafka / "broker1.keystore.jks").write_bytes(secret_bytes)
    (kafka / "ud.yaml").write_text("#cloud-config\nruncmd: [\"true\"]\n")
    (kafka / "nc.yaml").write_text("version: 2\nethernets:\n  eth0: {dhcp4: true}\n")
    (kafka / "vd.yaml").write_text("#cloud-config\npackages: [jq]\n")
    (ws.root / "link.jks").symlink_to(kafka / "broker1.keystore.jks")
    source = {"relative": "certs/kafka/broker1.keystore.jks",
              "absolute": str(kafka / "broker1.keystore.jks"),
              "symlink": "link.jks"}.get(how)
    text = LAB
    if source:
        text = LAB.replace('content: "hello broker1\\n"', f'source: "{source}"')
    else:
        name = {"user_data": "ud", "network_config": "nc", "vendor_data": "vd"}[how]
        text = LAB.replace("  broker2:\n", f"  broker2:\n    {how}: certs/kafka/{name}.yaml\n")
    lab = labmod.load(write_lab(ws.root, text))           # the lab file sits in the workspace
    host = "broker1" if source else "broker2"
    other = "broker2" if source else "broker1"
    outcomes = {o.step: o for o in build_seed_isos(lab, ws)}
    secret = ws.certs / "seed" / f"{host}.iso"
    assert seed_path(lab, ws, host) == secret and outcomes[f"seed-iso {host}"].paths == [secret]
    assert secret.stat().st_mode & 0o777 == 0o600
    assert not (ws.artifacts / "seed" / f"{host}.iso").exists()
    assert list(Manifest(ws.artifacts).entries()) == [f"seed/{other}.iso"]
    if source:
        wf = yaml.safe_load(read_seed(secret)["user-data"])["write_files"][0]
        assert base64.b64decode(wf["content"]) == secret_bytes
        for p in ws.artifacts.rglob("*"):
            if p.is_file():
                assert base64.b64encode(secret_bytes) not in p.read_bytes(), p


def test_user_supplied_files_are_used_as_is(tmp_path, ws, lab_key):
    ud = "#cloud-config\nhostname: custom\nruncmd: [\"true\"]\nfrobnicate: 1\n"
    nc = "network:\n  version: 2\n  ethernets:\n    eth0: {dhcp4: true}\n"
    (tmp_path / "ud.yaml").write_text(ud)
    (tmp_path / "nc.yaml").write_text(nc)
    (tmp_path / "vd.sh").write_text("#!/bin/sh\necho vendor\n")
    lab = labmod.load(write_lab(tmp_path, LAB + (
        "  custom:\n    ip: 10.100.0.20\n    user_data: ud.yaml\n"
        "    network_config: nc.yaml\n    vendor_data: vd.sh\n")))
    seed = seeds.render(lab, ws, "custom")
    assert seed.files["user-data"] == ud.encode() and seed.files["network-config"] == nc.encode()
    assert list(seed.files) == ["meta-data", "network-config", "user-data", "vendor-data"]
    assert any("'frobnicate'" in w for w in seed.warnings)
    build_seed_isos(lab, ws, hosts=["custom"])
    assert sorted(read_seed(ws.artifacts / "seed" / "custom.iso")) == \
        ["meta-data", "network-config", "user-data", "vendor-data"]


@pytest.mark.parametrize("text,ok", [
    ("#!/bin/sh\necho hi\n", True),
    ("#cloud-config\nruncmd: [ls]\n", True),
    ('Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n--XX\n'
     'Content-Type: text/cloud-config\n\nruncmd: [ls]\n--XX--\n', True),
    ("hostname: x\n", False),
])
def test_user_data_headers(text, ok):
    if ok:
        seeds.validate_user_data(text.encode(), "ud")
    else:
        with pytest.raises(LabError, match="must start with #cloud-config"):
            seeds.validate_user_data(text.encode(), "ud")


def test_jinja_user_data_is_checked_below_its_header():
    ok = "## template: jinja\n#cloud-config\nruncmd: [ls]\nfrobnicate: 1\n"
    assert any("unknown cloud-config key 'frobnicate'" in w
               for w in seeds.validate_user_data(ok.encode(), "ud"))
    # no jinja syntax: a YAML error is an error, with the file's line number
    bad = "## template: jinja\n#cloud-config\nruncmd:\n  - ls\n bad: [\n"
    with pytest.raises(LabError, match=r"^ud:5: invalid YAML"):
        seeds.validate_user_data(bad.encode(), "ud")
    # jinja syntax that is not YAML before rendering: the header is checked, with a warning
    tpl = ("## template: jinja\n#cloud-config\nruncmd:\n{% for n in [1, 2] %}\n"
           "  - echo {{ n }}\n{% endfor %}\n")
    (warning,) = seeds.validate_user_data(tpl.encode(), "ud")
    assert "not YAML before rendering" in warning and "checked the #cloud-config header only" \
        in warning
    with pytest.raises(LabError, match=r"^ud:2: .*needs #cloud-config"):
        seeds.validate_user_data(b"## template: jinja\nhostname: x\n", "ud")
    assert seeds.validate_user_data(b"## template: jinja\n#!/bin/sh\necho {{ v1.x }}\n",
                                      "ud") == []


@pytest.mark.parametrize("text", ["version: true\nconfig: []\n", "version: 2.0\nethernets: {}\n",
                                  "version: '2'\nethernets: {}\n"])
def test_network_config_version_must_be_the_number_1_or_2(text):
    with pytest.raises(LabError, match="'version: 1' or 'version: 2'"):
        seeds.validate_network_config(text.encode(), "nc")
    seeds.validate_network_config(b"version: 1\nconfig: []\n", "nc")


# ---- bad input through the CLI: one line, exit 1, nothing written ----------
def _no_iso(ws: Workspace) -> None:
    for d in (ws.artifacts / "seed", ws.certs / "seed"):
        assert not d.exists() or not any(d.glob("*.iso")), list(d.iterdir())


def test_cli_invalid_yaml_in_user_data_names_the_line(tmp_path, ws, cli, lab_key):
    (tmp_path / "ud.yaml").write_text("#cloud-config\nruncmd:\n  - ls\n bad: [\n")
    lab = write_lab(tmp_path, LAB.replace("  broker2:\n", "  broker2:\n    user_data: ud.yaml\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker2.user_data", "ud.yaml:4", "invalid YAML")
    _no_iso(ws)


@pytest.mark.parametrize("raw,needles", [
    (b"#cloud-config\nruncmd: [ls]\n? [a, b]\n: 1\n",
     ("ud.yaml:3: invalid YAML: a key must be a plain value", "not a list")),
    (b"#cloud-config\nruncmd: [ls]\nwrite_files:\n  - {[x]: 1}\n",
     ("ud.yaml:4: invalid YAML: a key must be a plain value",)),
    (b"#cloud-config\n# caf\xe9\nruncmd: [ls]\n", ("ud.yaml: not UTF-8 text",)),
])
def test_cli_unhashable_key_or_bad_encoding_in_user_data(tmp_path, ws, cli, lab_key, raw,
                                                        needles):
    (tmp_path / "ud.yaml").write_bytes(raw)
    lab = write_lab(tmp_path, LAB.replace("  broker2:\n", "  broker2:\n    user_data: ud.yaml\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker2.user_data", *needles)
    _no_iso(ws)


def test_cli_missing_ssh_key_file(tmp_path, ws, cli, lab_key):
    lab = write_lab(tmp_path, LAB.replace(
        "  broker2:\n", "  broker2:\n    ssh_authorized_keys: [keys/nope.pub]\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker2.ssh_authorized_keys[0]", "keys/nope.pub",
                          "no such file")
    _no_iso(ws)


def test_cli_missing_write_files_source(tmp_path, ws, cli, lab_key):
    lab = write_lab(tmp_path, LAB.replace(
        'content: "hello broker1\\n"', 'source: "certs:kafka/broker1.keystore.jks"'))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker1.write_files[0].source",
                          "broker1.keystore.jks", "run `invoke certs` first")
    _no_iso(ws)


def test_cli_no_lab_key(ws, cli):
    proc = cli("seed-iso")
    assert_one_line_error(proc, "no SSH key", "run `invoke certs` first",
                          "hosts.broker1.ssh_authorized_keys")
    _no_iso(ws)


def test_cli_builds_then_up_to_date(ws, cli, lab_key):
    first = cli("seed-iso", "--host", "broker1", check=True)
    assert first.stdout == "seed-iso broker1: built (artifacts/seed/broker1.iso)\n"
    again = cli("seed-iso", "--host", "broker1", check=True)
    assert again.stdout == "seed-iso broker1: up to date (artifacts/seed/broker1.iso)\n"
    proc = cli("seed-iso", "--host", "nosuch")
    assert_one_line_error(proc, "no host named 'nosuch'")


# ---- --format vfat: pure Python FAT12, checked with dosfstools and mtools ----
@pytest.mark.integration
def test_vfat_seed_is_a_clean_fat_volume_labelled_cidata(tmp_path, ws, lab_key):
    lab = labmod.load(write_lab(tmp_path, LAB))
    (o1, _) = build_seed_isos(lab, ws, fmt="vfat")
    img = ws.artifacts / "seed" / "broker1.img"
    assert o1.status == "built" and o1.paths == [img] and seed_path(lab, ws, "broker1", fmt="vfat") == img
    fsck = subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    bl = subprocess.run(["blkid", "-o", "export", str(img)], capture_output=True, text=True,
                        check=True).stdout.split()
    assert "LABEL=cidata" in bl and "TYPE=vfat" in bl
    listing = subprocess.run(["mdir", "-b", "-i", str(img), "::"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert sorted(Path(p).name for p in listing) == ["meta-data", "network-config", "user-data"]
    want = seeds.render(lab, ws, "broker1").files
    for name, data in want.items():
        got = subprocess.run(["mtype", "-i", str(img), f"::{name}"], capture_output=True,
                             check=True).stdout
        assert got == data, name
    rec = Manifest(ws.artifacts).get("seed/broker1.img")
    assert rec["kind"] == "seed-vfat" and rec["meta"]["format"] == "vfat"
    before = img.read_bytes()
    assert build_seed_isos(lab, ws, fmt="vfat", hosts=["broker1"])[0].status == "up to date"
    build_seed_isos(lab, ws, fmt="vfat", hosts=["broker1"], force=True)
    assert img.read_bytes() == before


@pytest.mark.integration
def test_vfat_holds_a_large_seed_and_long_names(tmp_path):
    from builders.artifacts.seed.vfat import make_vfat
    files = {"meta-data": b"instance-id: x\n", "network-config": b"version: 2\n",
             "user-data": b"#cloud-config\n" + b"# pad\n" * 500_000, "vendor-data": b""}
    img = tmp_path / "big.img"
    img.write_bytes(make_vfat(files, seeds.DEFAULT_EPOCH))
    fsck = subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mcopy", "-n", "-i", str(img), "::*", str(out)], check=True,
                   capture_output=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_yaml_emitters_agree_on_generated_content(tmp_path, ws, lab_key):
    """Seeds must not depend on whether PyYAML was built with libyaml."""
    import yaml as _yaml
    if not getattr(_yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML here has no libyaml: there is only one emitter")
    lab = labmod.load(write_lab(tmp_path, LAB))
    seed = seeds.render(lab, ws, "broker1")
    ud = _yaml.safe_load(seed.files["user-data"])
    for doc in (ud, _yaml.safe_load(seed.files["network-config"]),
                _yaml.safe_load(seed.files["meta-data"])):
        assert rendering.dump_yaml(doc, _yaml.CSafeDumper) == rendering.dump_yaml(doc, _yaml.SafeDumper)


# ---- more validation and edge cases ------------------------------------------
def test_marker_command_runs_without_a_serial_console(tmp_path, ws, lab_key):
    """The runcmd entry must print the marker and succeed even where
    /dev/ttyS0 or /dev/console cannot be written (here: a test process)."""
    lab = labmod.load(write_lab(tmp_path, LAB))
    ud = yaml.safe_load(seeds.render(lab, ws, "broker1").files["user-data"])
    argv = ud["runcmd"][-1]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == seed_marker(lab, "broker1", ws)


def test_seed_is_the_same_in_any_time_zone(tmp_path, ws, cli, lab_key):
    cli("seed-iso", "--host", "broker1", check=True)
    iso = ws.artifacts / "seed" / "broker1.iso"
    first = iso.read_bytes()
    cli("seed-iso", "--host", "broker1", "--force", env={"TZ": "America/Los_Angeles"}, check=True)
    assert iso.read_bytes() == first
    cli("seed-iso", "--host", "broker1", "--force", env={"TZ": "Asia/Kolkata"}, check=True)
    assert iso.read_bytes() == first


def test_cli_warns_about_unknown_cloud_config_keys(tmp_path, ws, cli, lab_key):
    (tmp_path / "ud.yaml").write_text("#cloud-config\nruncmd: [ls]\npackage_upgrades: true\n")
    lab = write_lab(tmp_path, LAB.replace("  broker2:\n", "  broker2:\n    user_data: ud.yaml\n"))
    proc = cli("seed-iso", "--lab", str(lab), "--host", "broker2", check=True)
    assert "unknown cloud-config key 'package_upgrades'" in proc.stderr
    assert "hosts.broker2.user_data" in proc.stderr and "ud.yaml" in proc.stderr
    assert proc.stdout.startswith("seed-iso broker2: built")


def test_cli_invalid_network_config(tmp_path, ws, cli, lab_key):
    (tmp_path / "nc.yaml").write_text("version: 2\nethernets:\n  eth0: {dhcp4: true\n")
    lab = write_lab(tmp_path, LAB.replace("  broker2:\n", "  broker2:\n    network_config: nc.yaml\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker2.network_config", "nc.yaml:", "invalid YAML")
    (tmp_path / "nc.yaml").write_text("ethernets: {}\n")
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "nc.yaml:1", "version: 2")
    _no_iso(ws)


def test_cli_user_data_without_header(tmp_path, ws, cli, lab_key):
    (tmp_path / "ud.yaml").write_text("hostname: x\n")
    lab = write_lab(tmp_path, LAB.replace("  broker2:\n", "  broker2:\n    user_data: ud.yaml\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "ud.yaml:1", "must start with #cloud-config")
    _no_iso(ws)


def test_cli_private_key_named_as_ssh_key(tmp_path, ws, cli, lab_key):
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n")
    lab = write_lab(tmp_path, LAB.replace(
        "  broker2:\n", "  broker2:\n    ssh_authorized_keys: [id]\n"))
    proc = cli("seed-iso", "--lab", str(lab))
    assert_one_line_error(proc, "hosts.broker2.ssh_authorized_keys[0]", "private key", ".pub")
    _no_iso(ws)


def test_ssh_keys_from_files_and_inline(tmp_path, ws):
    a = make_pubkey(tmp_path / "keys" / "a.pub", "alice")
    b = make_pubkey(tmp_path / "b.pub", "bob")
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        "  broker2:\n", f"  broker2:\n    ssh_authorized_keys: [keys/a.pub, \"{b}\"]\n")))
    ud = yaml.safe_load(seeds.render(lab, ws, "broker2").files["user-data"])
    assert ud["ssh_authorized_keys"] == [a, b]       # no lab key needed here


def test_size_limit(tmp_path, ws, cli, lab_key, monkeypatch):
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * 1024))
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        'content: "hello broker1\\n"', "source: big.bin")))
    monkeypatch.setattr(validate, "MAX_SEED_BYTES", 32 * 1024)
    with pytest.raises(LabError, match="over the 32 KiB limit"):
        build_seed_isos(lab, ws)
    _no_iso(ws)


def test_bad_source_date_epoch(ws, cli, lab_key):
    proc = cli("seed-iso", env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert_one_line_error(proc, "SOURCE_DATE_EPOCH", "'yesterday'")
    proc = cli("seed-iso", "--format", "udf")
    assert_one_line_error(proc, "--format", "'udf'")
    _no_iso(ws)


def test_certs_source_cannot_escape_certs(tmp_path, ws, lab_key):
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        'content: "hello broker1\\n"', 'source: "certs:../lab.yaml"')))
    with pytest.raises(LabError, match="must name a file under certs/"):
        seeds.render(lab, ws, "broker1")


def test_seed_moves_between_public_and_secret(tmp_path, ws, lab_key):
    (ws.certs_dir("kafka") / "k.jks").write_bytes(b"jks")
    public_lab = labmod.load(write_lab(tmp_path, LAB, "public.yaml"))
    secret_lab = labmod.load(write_lab(tmp_path, LAB.replace(
        'content: "hello broker1\\n"', 'source: "certs:kafka/k.jks"'), "secret.yaml"))
    build_seed_isos(public_lab, ws, hosts=["broker1"])
    public = ws.artifacts / "seed" / "broker1.iso"
    assert public.exists()
    build_seed_isos(secret_lab, ws, hosts=["broker1"])
    assert not public.exists() and Manifest(ws.artifacts).get("seed/broker1.iso") is None
    assert (ws.certs / "seed" / "broker1.iso").exists()
    build_seed_isos(public_lab, ws, hosts=["broker1"])
    assert public.exists() and not (ws.certs / "seed" / "broker1.iso").exists()
    assert SecretLedger(ws.certs / "seed").entries() == {}


def test_lab_checks_nic_names(tmp_path):
    with pytest.raises(LabError, match="dhcp_interface: 'eth1' is also the lab NIC"):
        labmod.load(write_lab(tmp_path, LAB.replace(
            "  broker2:\n", "  broker2:\n    dhcp_interface: eth1\n")))
    with pytest.raises(LabError, match="interface: 'lab 0' is not a Linux interface name"):
        labmod.load(write_lab(tmp_path, LAB.replace(
            "  broker2:\n", "  broker2:\n    interface: lab 0\n")))
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        "  broker2:\n", "  broker2:\n    dhcp_interface: \"\"\n    interface: ens4\n")))
    net = yaml.safe_load(rendering.dump_yaml(rendering.network_config(lab, lab.host("broker2"))))
    assert list(net["ethernets"]) == ["ens4"]


def test_a_failed_write_leaves_no_partial_files(default_lab, ws, lab_key, monkeypatch):
    """The disk fills up while the second seed is staged: one line, no seed
    in place, no temporary file left, nothing recorded."""
    real = open
    calls = []

    def failing_open(file, mode="r", *args, **kw):
        if "x" in mode:                       # the stage creating a temporary file
            calls.append(file)
            if len(calls) == 2:
                raise OSError(28, "No space left on device", str(file))
        return real(file, mode, *args, **kw)

    monkeypatch.setattr(contract, "open", failing_open, raising=False)
    with pytest.raises(LabError, match="cannot write the seeds: No space left on device"):
        build_seed_isos(default_lab, ws)
    seed_dir = ws.artifacts / "seed"
    assert not seed_dir.exists() or list(seed_dir.iterdir()) == []
    assert Manifest(ws.artifacts).entries() == {}
    monkeypatch.undo()
    assert {o.status for o in build_seed_isos(default_lab, ws)} == {"built"}


def test_the_seeds_name_the_installed_pycdlib():
    """The version recorded as a seed's tool (read from its dist-info) is
    the one pip installed."""
    from importlib.metadata import version

    from builders.artifacts.seed.iso import pycdlib_version
    assert pycdlib_version() == version("pycdlib")
