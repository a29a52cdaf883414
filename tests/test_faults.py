"""The bad-input and fault suite: every bad input across the pipeline gives
one clear line, exit status 1, nothing half-written and an unchanged
manifest; a run killed with SIGKILL at any point is completed by a rerun.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import ROOT, assert_one_line_error

DEFAULT = (ROOT / "lab.yaml").read_text()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 and mode (what 'unchanged' means)."""
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name not in (".lock", ".manifest.lock"):
                out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest()
                                                 + oct(p.stat().st_mode & 0o777))
    return out


def lab_with(change: Callable[[dict], None]) -> str:
    data = yaml.safe_load(DEFAULT)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def _set(path: str, value):
    def change(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return change


# (id, lab.yaml text, needle in the error line)
LAB_CASES = [
    ("ip-outside-network", lab_with(_set("hosts.broker2.ip", "10.200.0.12")),
     "hosts.broker2.ip: 10.200.0.12 is not in network private (10.100.0.0/24)"),
    ("ip-not-an-address", lab_with(_set("hosts.broker1.ip", "10.100.0.999")), "hosts.broker1.ip:"),
    ("ip-duplicate", lab_with(_set("hosts.broker3.ip", "10.100.0.11")), "already used by host broker1"),
    ("ip-is-gateway", lab_with(_set("hosts.broker1.ip", "10.100.0.1")), "is the gateway"),
    ("ip-is-broadcast", lab_with(_set("hosts.broker1.ip", "10.100.0.255")), "broadcast"),
    ("cidr-host-bits", lab_with(_set("networks.private.cidr", "10.100.0.5/24")), "networks.private.cidr"),
    ("cidr-garbage", lab_with(_set("networks.private.cidr", "ten-net")), "networks.private.cidr"),
    ("gateway-outside", lab_with(_set("networks.private.gateway", "192.168.1.1")), "networks.private.gateway"),
    ("hostname-underscore", lab_with(_set("hosts.bro_ker", {"ip": "10.100.0.20"})), "not a valid hostname"),
    ("hostname-too-long", lab_with(_set("hosts." + "b" * 64, {"ip": "10.100.0.20"})), "not a valid hostname"),
    ("unknown-top-key", lab_with(_set("hostz", {})), "hostz: unknown key"),
    ("unknown-host-key", lab_with(_set("hosts.broker1.ram", 4096)), "hosts.broker1.ram: unknown key"),
    ("wrong-type-cpus", lab_with(_set("hosts.broker1.cpus", "two")), "hosts.broker1.cpus: expected a whole number"),
    ("wrong-type-bool", lab_with(_set("octavia.enabled", "maybe")), "octavia.enabled: expected true or false"),
    ("memory-too-small", lab_with(_set("hosts.broker1.memory", 64)), "hosts.broker1.memory"),
    ("bad-mac", lab_with(_set("hosts.broker1.mac", "zz:54:00:00:00:01")), "hosts.broker1.mac"),
    ("duplicate-mac", lab_with(_set("hosts.broker2.mac", "52:54:00:64:00:0b")), "already used by host broker1"),
    ("unknown-network-ref", lab_with(_set("hosts.broker1.network", "public")), "no network named 'public'"),
    ("unknown-broker-ref", lab_with(_set("kafka.brokers", ["broker1", "kafka9"])), "kafka.brokers[1]"),
    ("weak-rsa", lab_with(_set("pki.rsa_bits", 1024)), "pki.rsa_bits: 1024"),
    ("leaf-longer-than-ca", lab_with(_set("pki.leaf_days", 5000)), "pki.leaf_days"),
    ("bad-key-type", lab_with(_set("pki.key_type", "dsa")), "pki.key_type"),
    ("bad-health-manager", lab_with(_set("octavia.health_managers", ["10.100.0.5"])), "octavia.health_managers[0]"),
    ("bad-amphora-os", lab_with(_set("octavia.amphora.base_os", "centos")), "octavia.amphora.base_os"),
    ("bad-image-type", lab_with(_set("octavia.amphora.image_type", "vmdk")), "octavia.amphora.image_type"),
    ("bad-box-name", lab_with(_set("vagrant.box", "no-slash")), "vagrant.box"),
    ("bad-domain", lab_with(_set("domain", "-bad-.example")), "domain:"),
    ("hosts-not-mapping", lab_with(_set("hosts", ["broker1"])), "hosts: expected a mapping"),
    ("top-level-list", "- just\n- a list\n", "the top level must be a mapping"),
    ("yaml-syntax", DEFAULT.replace("cidr: 10.100.0.0/24", "cidr: [10.100.0.0/24"), "invalid YAML"),
    ("duplicate-host-key", DEFAULT.replace("  broker3:\n", "  broker2:\n    ip: 10.100.0.14\n  broker3:\n", 1),
     "'broker2' is given twice"),
    ("write-file-relative", lab_with(_set("hosts.broker1.write_files", [{"path": "etc/x", "content": "x"}])),
     "write_files[0].path"),
    ("write-file-both", lab_with(_set("hosts.broker1.write_files", [{"path": "/etc/x", "content": "x", "source": "f"}])),
     "give exactly one of source or content"),
]


@pytest.mark.parametrize("case_id,text,needle", LAB_CASES, ids=[c[0] for c in LAB_CASES])
@pytest.mark.parametrize("task", ["check-lab", "all"])
def test_bad_lab_yaml(tmp_path, ws, cli, case_id, text, needle, task):
    lab = tmp_path / "lab.yaml"
    lab.write_text(text)
    before = snapshot(ws.root)
    proc = cli(task, "--lab", str(lab))
    assert_one_line_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert snapshot(ws.root) == before


def test_missing_lab_file(tmp_path, cli):
    assert_one_line_error(cli("all", "--lab", str(tmp_path / "nope.yaml")),
                          "lab file not found; pass --lab FILE")


def test_unknown_step_name(cli):
    assert_one_line_error(cli("all", "--only", "kernel"), "--only kernel: unknown step")
