"""Octavia settings of the lab that labforge cannot derive (cloud IDs)."""

from __future__ import annotations

import pytest
import yaml

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
