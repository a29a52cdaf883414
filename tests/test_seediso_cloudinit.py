"""seed-iso against Debian's real cloud-init (without booting anything).

`cloud-init schema --config-file` validates the generated user-data with the
schema of the cloud-init Debian 12 guests run; cloud-init's own Python code
(the system python that Debian's package installs into) reads the extracted
seed the way the NoCloud datasource does, and `cloud-init devel net-convert`
renders the network-config with cloud-init's eni and networkd renderers for
Debian.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from builders.core import lab as labmod
from builders.artifacts.seed import build_seed_isos, seed_marker, seed_path

from helpers import write_lab
from test_seediso import LAB, make_pubkey

pytestmark = pytest.mark.integration

READER = Path(__file__).parent / "data" / "cloudinit_read_seed.py"


def _cloud_init_python() -> str:
    exe = shutil.which("cloud-init")
    assert exe, "cloud-init is installed by scripts/packages/seed.test"
    first = Path(exe).read_text().splitlines()[0]
    assert first.startswith("#!"), first
    return first[2:].strip().split()[0]


def _extract(iso: Path, dest: Path) -> Path:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(dest)],
                   check=True, capture_output=True)
    return dest


def _read_like_nocloud(seed_dir: Path, work: Path) -> dict:
    proc = subprocess.run([_cloud_init_python(), str(READER), str(seed_dir), str(work)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    got["render"] = {}
    if "network-config" in got["files"]:
        for kind in ("eni", "networkd"):
            out = work / f"net-{kind}"
            conv = subprocess.run(["cloud-init", "devel", "net-convert", "-p",
                                   str(seed_dir / "network-config"), "-k", "yaml", "-d", str(out),
                                   "-D", "debian", "-O", kind], capture_output=True, text=True)
            assert conv.returncode == 0, conv.stdout + conv.stderr
            for p in out.rglob("*"):
                if p.is_file():
                    got["render"][f"{kind}:{p.relative_to(out)}"] = p.read_text()
    return got


@pytest.fixture
def kafka_lab(tmp_path, ws):
    make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")
    (ws.certs_dir("kafka") / "broker1.keystore.jks").write_bytes(b"\xfe\xed\xfe\xed jks")
    text = LAB.replace(
        '      - {path: /etc/labforge/hello.txt',
        '      - {path: /etc/kafka/ssl/broker1.keystore.jks, source: "certs:kafka/broker1.keystore.jks",'
        ' owner: "kafka:kafka", permissions: "0600"}\n'
        '      - {path: /etc/labforge/hello.txt')
    return labmod.load(write_lab(tmp_path, text))


def test_cloud_init_schema_accepts_generated_user_data(kafka_lab, default_lab, ws, tmp_path):
    build_seed_isos(kafka_lab, ws)
    make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")
    build_seed_isos(default_lab, ws, hosts=["broker3"])
    for host, lab in (("broker1", kafka_lab), ("broker2", kafka_lab), ("broker3", default_lab)):
        seed = _extract(seed_path(lab, ws, host), tmp_path / f"x-{host}")
        proc = subprocess.run(["cloud-init", "schema", "--config-file", str(seed / "user-data")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, (host, proc.stdout, proc.stderr)
        assert "Valid cloud-config" in proc.stdout, proc.stdout
        assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stderr


def test_nocloud_reads_the_seed_and_renders_the_network(kafka_lab, ws, tmp_path):
    build_seed_isos(kafka_lab, ws)
    got = _read_like_nocloud(_extract(seed_path(kafka_lab, ws, "broker1"), tmp_path / "s1"),
                             tmp_path / "w1")
    marker = seed_marker(kafka_lab, "broker1", ws)
    assert got["files"] == ["meta-data", "network-config", "user-data"]
    assert got["meta"] == {"instance-id": marker.split()[-1], "local-hostname": "broker1"}
    assert got["parts"] == ["text/cloud-config"]
    (cfg,) = got["cloud_config"]
    assert cfg["hostname"] == "broker1" and cfg["fqdn"] == "broker1.lab.test"
    assert [w["path"] for w in cfg["write_files"]] == ["/etc/kafka/ssl/broker1.keystore.jks",
                                                       "/etc/labforge/hello.txt", "/etc/hosts"]
    assert marker in cfg["runcmd"][-1][-1]
    r = got["render"]
    eni = r["eni:etc/network/interfaces.d/50-cloud-init"]
    assert "auto eth0\niface eth0 inet dhcp" in eni
    assert "iface lab0 inet static\n    address 10.100.0.11/24" in eni
    assert 'ATTR{address}=="52:54:00:64:00:0b", NAME="lab0"' in \
        r["eni:etc/udev/rules.d/70-persistent-net.rules"]
    nd = r["networkd:etc/systemd/network/10-cloud-init-lab0.network"]
    assert "MACAddress=52:54:00:64:00:0b" in nd and "Address=10.100.0.11/24" in nd
    assert "Gateway" not in nd            # the lab network does not route out

    # broker2 has no MAC: the lab NIC is eth1 by name
    got2 = _read_like_nocloud(_extract(seed_path(kafka_lab, ws, "broker2"), tmp_path / "s2"),
                              tmp_path / "w2")
    assert "iface eth1 inet static\n    address 10.100.0.12/24" in \
        got2["render"]["eni:etc/network/interfaces.d/50-cloud-init"]


def test_nat_network_gets_a_default_route(tmp_path, ws):
    make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        "gateway: 10.100.0.1}", "gateway: 10.100.0.1, forward: nat}")))
    build_seed_isos(lab, ws, hosts=["broker1"])
    got = _read_like_nocloud(_extract(seed_path(lab, ws, "broker1"), tmp_path / "s"),
                             tmp_path / "w")
    nd = got["render"]["networkd:etc/systemd/network/10-cloud-init-lab0.network"]
    assert "Gateway=10.100.0.1" in nd and "DNS=10.100.0.1" in nd


def test_user_supplied_mime_user_data_is_read_by_cloud_init(tmp_path, ws):
    make_pubkey(ws.certs / "ssh" / "lab_ed25519.pub")
    (tmp_path / "ud.mime").write_text(
        'Content-Type: multipart/mixed; boundary="==X=="\nMIME-Version: 1.0\n\n'
        '--==X==\nContent-Type: text/cloud-config; charset="us-ascii"\n\n'
        'hostname: mime-host\n'
        '--==X==\nContent-Type: text/x-shellscript; charset="us-ascii"\n\n'
        '#!/bin/sh\necho from-mime\n'
        '--==X==--\n')
    lab = labmod.load(write_lab(tmp_path, LAB.replace(
        "  broker2:\n", "  broker2:\n    user_data: ud.mime\n")))
    build_seed_isos(lab, ws, hosts=["broker2"])
    got = _read_like_nocloud(_extract(seed_path(lab, ws, "broker2"), tmp_path / "s"),
                             tmp_path / "w")
    assert got["parts"] == ["text/cloud-config", "text/x-shellscript"]
    assert got["cloud_config"] == [{"hostname": "mime-host"}]


def test_nocloud_reads_a_vfat_seed(kafka_lab, ws, tmp_path):
    (o, _) = build_seed_isos(kafka_lab, ws, fmt="vfat")
    img = o.paths[0]
    assert img.name == "broker1.img"
    out = tmp_path / "vfat"
    out.mkdir()
    subprocess.run(["mcopy", "-n", "-i", str(img), "::*", str(out)], check=True,
                   capture_output=True)
    got = _read_like_nocloud(out, tmp_path / "w")
    assert got["files"] == ["meta-data", "network-config", "user-data"]
    assert got["meta"]["instance-id"] == seed_marker(kafka_lab, "broker1", ws).split()[-1]
    assert got["parts"] == ["text/cloud-config"]
