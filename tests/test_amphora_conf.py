"""Octavia settings of the lab that labforge cannot derive (cloud IDs)."""

from __future__ import annotations

import pytest
import yaml

from builders.checks import amphora_lb
from builders.core import lab as labmod
from builders.core.errors import LabError
from tests.conftest import ROOT


def _lab(tmp_path, **octavia):
    data = yaml.safe_load((ROOT / "lab.yaml").read_text())
    data["octavia"].update(octavia)
    p = tmp_path / "lab.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return labmod.load(p)


def test_cloud_ids_are_optional(default_lab):
    o = default_lab.octavia
    assert (o.amp_boot_network_list, o.amp_secgroup_list, o.amp_flavor_id) == ((), (), None)


def test_cloud_ids_from_the_lab(tmp_path):
    o = _lab(tmp_path, amp_boot_network_list=["3f1b-net"], amp_secgroup_list=["sg-1", "sg-2"],
             amp_flavor_id="amphora-flavor").octavia
    assert o.amp_boot_network_list == ("3f1b-net",)
    assert o.amp_secgroup_list == ("sg-1", "sg-2")
    assert o.amp_flavor_id == "amphora-flavor"


@pytest.mark.parametrize("over,where", [
    ({"amp_flavor_id": "a flavor"}, "octavia.amp_flavor_id"),
    ({"amp_boot_network_list": ["ok", "net,2"]}, "octavia.amp_boot_network_list[1]"),
])
def test_bad_cloud_id_names_the_key(tmp_path, over, where):
    with pytest.raises(LabError) as err:
        _lab(tmp_path, **over)
    assert where in "\n".join(err.value.lines())


# --------------------------------------------------------------------------
# the Octavia configuration snippet (certs/octavia/octavia-certificates.conf)
# --------------------------------------------------------------------------
def _snippet(lab, ws) -> str:
    from builders.artifacts import certs
    certs.build_certs(lab, ws)
    return (ws.certs / "octavia" / "octavia-certificates.conf").read_text()


def test_snippet_has_the_health_manager_and_marked_placeholders(default_lab, ws):
    text = _snippet(default_lab, ws)
    hm = text.split("[health_manager]", 1)[1]
    assert "\nbind_ip = 10.100.0.5\n" in hm and "\nbind_port = 5555\n" in hm
    assert "\ncontroller_ip_port_list = 10.100.0.5:5555\n" in hm
    cw = text.split("[controller_worker]", 1)[1].split("\n[", 1)[0]
    assert "\namp_image_tag = amphora\n" in cw and "\namp_ssh_key_name = octavia_ssh_key\n" in cw
    for key in ("amp_boot_network_list", "amp_secgroup_list", "amp_flavor_id"):
        assert f"\n# {key} = <" in cw and f"set octavia.{key} in lab.yaml" in cw, key
        assert f"\n{key} =" not in cw                      # never an active made-up value


def test_snippet_takes_the_cloud_ids_from_the_lab(tmp_path, ws):
    lab = _lab(tmp_path, amp_boot_network_list=["net-a"], amp_secgroup_list=["sg-1", "sg-2"],
               amp_flavor_id="flavor-9", health_managers=["192.0.2.7:5555", "192.0.2.8:5555"])
    cw = _snippet(lab, ws).split("[controller_worker]", 1)[1].split("\n[", 1)[0]
    assert "\namp_boot_network_list = net-a\n" in cw
    assert "\namp_secgroup_list = sg-1, sg-2\n" in cw
    assert "\namp_flavor_id = flavor-9\n" in cw and "PLACEHOLDER" not in cw


@pytest.mark.integration
@pytest.mark.skipif(not (amphora_lb.OCTAVIA_VENV / "bin" / "python").is_file(),
                    reason=".venv-octavia missing: run bash scripts/setup.d/octavia.sh")
def test_octavia_reads_the_snippet(tmp_path, ws):
    """Octavia's own option definitions parse the snippet into what the lab says."""
    import json
    import subprocess
    lab = _lab(tmp_path, amp_boot_network_list=["net-a"], amp_secgroup_list=["sg-1", "sg-2"],
               amp_flavor_id="flavor-9")
    _snippet(lab, ws)
    code = ("import json, sys, warnings; warnings.filterwarnings('ignore')\n"
            "from oslo_config import cfg\nimport octavia.common.config\n"
            "cfg.CONF(args=['--config-file', sys.argv[1]], project='octavia', default_config_dirs=[])\n"
            "c = cfg.CONF\nprint(json.dumps({'bind_ip': str(c.health_manager.bind_ip), "
            "'bind_port': c.health_manager.bind_port, "
            "'controllers': c.health_manager.controller_ip_port_list, "
            "'networks': c.controller_worker.amp_boot_network_list, "
            "'secgroups': c.controller_worker.amp_secgroup_list, "
            "'flavor': c.controller_worker.amp_flavor_id, 'tag': c.controller_worker.amp_image_tag, "
            "'validity': c.certificates.cert_validity_time}))\n")
    out = subprocess.run([str(amphora_lb.OCTAVIA_VENV / "bin" / "python"), "-c", code,
                          str(ws.certs / "octavia" / "octavia-certificates.conf")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"bind_ip": "10.100.0.5", "bind_port": 5555, "controllers": ["10.100.0.5:5555"],
                   "networks": ["net-a"], "secgroups": ["sg-1", "sg-2"], "flavor": "flavor-9",
                   "tag": "amphora", "validity": 30 * 86400}
