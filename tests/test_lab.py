"""lab.yaml loading and validation."""

from __future__ import annotations

import dataclasses

import pytest

from builders.core import lab as labmod
from builders.core.errors import LabError
from helpers import ROOT, assert_one_line_error, lab_data, lab_file, problems, write_lab


def problems_of(**changes) -> list[str]:
    """The problems of the default lab with ``changes`` (see helpers.lab_data)."""
    return problems(lab_data(**changes))


def test_default_lab_is_the_kafka_and_octavia_lab(default_lab):
    assert [h.name for h in default_lab.brokers()] == ["broker1", "broker2", "broker3"]
    assert [str(h.ip) for h in default_lab.hosts] == ["10.100.0.11", "10.100.0.12", "10.100.0.13"]
    assert str(default_lab.networks[0].cidr) == "10.100.0.0/24"
    assert default_lab.octavia.amp_image_tag == "amphora"
    assert default_lab.kafka.client
    assert default_lab.fqdn(default_lab.hosts[0]) == "broker1.lab.internal"


def test_objects_are_frozen(default_lab):
    with pytest.raises(dataclasses.FrozenInstanceError):
        default_lab.hosts[0].ip = "1.2.3.4"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        default_lab.octavia.amphora.size = 9  # type: ignore[misc]


def test_ip_outside_network_names_field_and_network():
    out = problems_of(**{"hosts.broker2.ip": "10.200.0.12"})
    assert out == ["lab.yaml: hosts.broker2.ip: 10.200.0.12 is not in network private (10.100.0.0/24)"]


@pytest.mark.parametrize("changes,needle", [
    ({"hosts.broker1.cpu": 2}, "hosts.broker1.cpu: unknown key (did you mean 'cpus'?)"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"hosts.broker1.memory": "lots"}, "hosts.broker1.memory: expected a whole number"),
    ({"hosts.broker1.ip": "10.100.0.300"}, "hosts.broker1.ip: '10.100.0.300' is not an IPv4 address"),
    ({"networks.private.cidr": "10.100.0.1/24"}, "networks.private.cidr:"),
    ({"hosts.Broker_4": {"ip": "10.100.0.14"}}, "hosts.Broker_4: 'Broker_4' is not a valid hostname"),
    ({"hosts.broker2.ip": "10.100.0.11"}, "hosts.broker2.ip: 10.100.0.11 is already used by host broker1"),
    ({"hosts.broker1.network": "dmz"}, "hosts.broker1.network: no network named 'dmz'"),
    ({"hosts.broker1.mac": "52:54:00"}, "hosts.broker1.mac:"),
    ({"pki.rsa_bits": 1024}, "pki.rsa_bits: 1024"),
    ({"pki.key_type": "dsa"}, "pki.key_type: 'dsa' is not one of rsa, ecdsa"),
    ({"octavia.health_managers": ["10.100.0.5"]}, "octavia.health_managers[0]"),
    ({"kafka.brokers": ["broker9"]}, "kafka.brokers[0]: no host named 'broker9'"),
    ({"hosts.broker1.ip": "10.100.0.1"}, "is the gateway"),
    ({"hosts.broker1.disk": 0}, "hosts.broker1.disk: 0 GiB is out of range"),
    ({"octavia.amphora.base_os": "centos"}, "octavia.amphora.base_os: 'centos' is not one of"),
    ({"octavia.amp_ssh_key_name": "heartbeat_key"},
     "octavia.amp_ssh_key_name: 'heartbeat_key' is the name of another file in certs/octavia/"),
    ({"octavia.amp_ssh_key_name": "server_ca.cert.pem"}, "another file"),
    ({"octavia.amp_ssh_key_name": ".."}, "not a valid key pair name"),
])
def test_each_bad_value_is_one_named_problem(changes, needle):
    out = problems_of(**changes)
    assert len(out) == 1, out
    assert needle in out[0], out


def test_octavia_file_names_match_the_certs_builder():
    """The names amp_ssh_key_name may not take are exactly the other Octavia files."""
    from builders.artifacts.certs.octavia import F
    assert labmod.OCTAVIA_FILES == set(F.values())


def test_all_problems_are_reported_at_once():
    out = problems_of(**{"hosts.broker2.ip": "10.200.0.12", "hosts.broker3.cpus": "two",
                         "hosts.bad_name": {"ip": "10.100.0.20"}})
    assert out[0] == "lab.yaml: 3 problems; fix them and rerun"
    assert len(out) == 4


def test_duplicate_host_is_an_error(tmp_path):
    text = (ROOT / "lab.yaml").read_text().replace(
        "  broker3:\n", "  broker1:\n    ip: 10.100.0.14\n  broker3:\n", 1)
    with pytest.raises(LabError) as err:
        labmod.load(write_lab(tmp_path, text))
    assert "'broker1' is given twice" in "\n".join(err.value.lines())


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write_lab(tmp_path, "name: lab\nhosts:\n  broker1: {ip: [\n")
    with pytest.raises(LabError) as err:
        labmod.load(p)
    assert str(err.value).startswith("lab.yaml:")
    assert "invalid YAML" in str(err.value)


@pytest.mark.parametrize("raw,needles", [
    (b"name: lab\n# caf\xe9 (latin-1)\nhosts: {}\n",
     ("lab.yaml:2: not UTF-8 text (byte 0xe9", "save the file as UTF-8")),
    (b"name: lab\nhosts:\n  {[a]: 1}: x\n",
     ("lab.yaml:3: invalid YAML: a key must be a plain value", "not a list")),
    (b"name: lab\n? {a: 1}\n: x\n",
     ("lab.yaml:2: invalid YAML: a key must be a plain value", "not a mapping")),
])
def test_undecodable_or_unhashable_lab_is_one_line(tmp_path, cli, raw, needles):
    p = tmp_path / "lab.yaml"
    p.write_bytes(raw)
    with pytest.raises(LabError) as err:
        labmod.load(p)
    assert err.value.lines() == [str(err.value)]
    for n in needles:
        assert n in str(err.value)
    assert_one_line_error(cli("check-lab", "--lab", str(p)), *needles)


def test_missing_lab_file_says_what_to_do(tmp_path):
    with pytest.raises(LabError, match="lab file not found; pass --lab FILE"):
        labmod.load(tmp_path / "nope.yaml")


def test_cli_reports_bad_lab_without_traceback(tmp_path, cli):
    proc = cli("check-lab", "--lab", str(lab_file(tmp_path, **{"hosts.broker2.ip": "10.200.0.12"})))
    assert_one_line_error(proc, "hosts.broker2.ip: 10.200.0.12 is not in network private (10.100.0.0/24)")


def test_cli_check_lab_ok(cli):
    proc = cli("check-lab", check=True)
    assert "broker3" in proc.stdout


def test_readme_lists_every_lab_key():
    """README's lab.yaml table names every key of the schema (nested ones too)."""
    import re
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## lab.yaml"):text.index("A problem in the file is reported")]
    shown = set()
    for token in re.findall(r"`([^`]+)`", section):
        shown.update(part for part in re.split(r"[./ ]", token) if part)
    missing = []

    def walk(cls, where):
        for f in dataclasses.fields(cls):
            if cls is labmod.Lab and f.name in ("source", "raw"):
                continue
            if f.name not in shown:
                missing.append(f"{where}{f.name}")
            inner = labmod.typing.get_type_hints(cls)[f.name]
            for arg in (inner, *labmod.typing.get_args(inner)):
                if dataclasses.is_dataclass(arg):
                    walk(arg, f"{where}{f.name}.")
    walk(labmod.Lab, "")
    assert not missing, f"README.md lab.yaml table lacks: {missing}"
