"""Acceptance: the Kafka lab comes up from labforge's outputs with `vagrant up`.

The session's main job (`invoke all` of the default lab: certs, seeds, the
base image with ZooKeeper baked in, the box, the Vagrantfile and the network
XML) is what boots: nothing is built twice.  A test lab that differs from
the default only in memory (1024 MiB per broker, to fit a shared 2-core
machine) re-renders the Vagrantfile.  Then, as the Vagrantfile's header
says: define and start the two networks, `vagrant up --provider=libvirt`
(vagrant-libvirt, driver qemu where KVM cannot run guests), `invoke
lab-check` (names, a TLS ZooKeeper ensemble of one leader and two
followers, client certificates by name and address, a foreign CA refused),
and `vagrant destroy -f`, after which no domain, volume or network of the
lab is left in libvirt.

libvirtd: the session's (tests/conftest.py); a storage pool `default` is created when
missing (and removed again).  QEMU runs as libvirt-qemu, which must be able
to reach the seeds: the test opens the workspace's directories for
traversal (o+x), as docs/kafka-lab.md tells users to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MEMORY = 1024                   # MiB per broker in the test lab


def _virsh(uri: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          check=check, timeout=120)


@pytest.fixture(scope="module")
def default_pool(libvirtd):
    """The storage pool `default` vagrant-libvirt puts volumes in; made when missing."""
    for tool in ("vagrant", "dnsmasq", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/packages/vagrant.test)")
    uri = libvirtd
    made = False
    if _virsh(uri, "pool-info", "default").returncode != 0:
        target = Path("/var/lib/libvirt/images")
        target.mkdir(parents=True, exist_ok=True)
        _virsh(uri, "pool-define-as", "default", "dir", "--target", str(target), check=True)
        _virsh(uri, "pool-build", "default")
        _virsh(uri, "pool-start", "default", check=True)
        made = True
    elif "running" not in _virsh(uri, "pool-info", "default").stdout:
        _virsh(uri, "pool-start", "default", check=True)
    yield "default"
    if made:
        _virsh(uri, "pool-destroy", "default")
        _virsh(uri, "pool-undefine", "default")


def _open_for_qemu(path: Path) -> None:
    """Let QEMU (user libvirt-qemu) traverse the directories down to ``path``."""
    for p in [*reversed(path.parents), path]:
        if p == Path("/"):
            continue
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, (mode & 0o7777) | 0o001)


def _lab_state(uri: str, pool: str, machines: list[str], nets: list[str]) -> dict[str, list[str]]:
    doms = _virsh(uri, "list", "--all", "--name").stdout.split()
    vols = _virsh(uri, "vol-list", pool).stdout
    netlist = _virsh(uri, "net-list", "--all", "--name").stdout.split()
    return {"domains": [d for d in doms if any(d.endswith(f"_{m}") for m in machines)],
            "volumes": [ln.split()[0] for ln in vols.splitlines()[2:]
                        if ln.strip() and any(f"_{m}" in ln.split()[0] for m in machines)],
            "networks": [n for n in netlist if n in nets]}


def test_vagrant_up_of_the_default_lab_passes_lab_check(main_job, libvirtd, default_pool,
                                                         tmp_path, report):
    assert main_job.first.returncode == 0, main_job.first.stderr[-4000:]
    ws, cli, uri = main_job.ws, main_job.cli, libvirtd
    data = yaml.safe_load((ROOT / "lab.yaml").read_text())
    for h in data["hosts"].values():
        h["memory"] = MEMORY
    lab_path = tmp_path / "lab.yaml"
    lab_path.write_text(yaml.safe_dump(data, sort_keys=False))

    # `invoke all` of the test lab: everything up to date but the Vagrantfile
    t_all = time.monotonic()
    again = cli("all", "--lab", str(lab_path), "--json", env=main_job.env, timeout=1800)
    assert again.returncode == 0, again.stderr[-4000:]
    statuses = {s["name"]: s["status"] for s in json.loads(again.stdout)["steps"]}
    assert statuses["base-image"] == "up to date", statuses     # built once, by the main job
    all_done = time.monotonic()
    all_seconds = all_done - t_all

    vdir = ws.artifacts / "vagrant"
    vfile = (vdir / "Vagrantfile").read_text()
    assert f"libvirt.memory = {MEMORY}" in vfile
    header = [ln for ln in vfile.splitlines() if ln.startswith("#   ")]
    assert "#   vagrant up --provider=libvirt" in header
    for seeds in (ws.certs / "seed", ws.artifacts / "seed"):
        if seeds.is_dir():
            _open_for_qemu(seeds)

    from builders.core import lab as labmod
    lab = labmod.load(lab_path)
    machines = [h.name for h in lab.hosts]
    nets = [n.name for n in lab.networks]
    env = dict(os.environ, LIBVIRT_DEFAULT_URI=uri, VAGRANT_HOME=str(tmp_path / "vagrant.d"),
               VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_DEFAULT_PROVIDER="libvirt")
    log_path = tmp_path / "vagrant-up.log"
    up_seconds = check_seconds = None
    try:
        assert _lab_state(uri, default_pool, machines, nets) == \
            {"domains": [], "volumes": [], "networks": []}, "a lab is already defined here"
        # the Vagrantfile header's sequence, in artifacts/vagrant/
        for net in nets:
            _virsh(uri, "net-define", str(vdir / "networks" / f"{net}.xml"), check=True)
            started = _virsh(uri, "net-start", net)
            assert started.returncode == 0, started.stderr
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            up = subprocess.run(["vagrant", "up", "--provider=libvirt"], cwd=vdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=3600)
        up_seconds = time.monotonic() - t0
        text = log_path.read_text(errors="replace")
        assert up.returncode == 0, text[-6000:]
        check = cli("lab-check", "--lab", str(lab_path), "--wait", "600", "--json",
                    timeout=1200)
        check_seconds = time.monotonic() - t0 - up_seconds
        report(f"kafka lab: `invoke all` (test lab, up to date but the Vagrantfile) "
               f"{all_seconds:.1f}s; vagrant up of 3 brokers {up_seconds:.0f}s; lab-check "
               f"passed {check_seconds:.0f}s later; from `invoke all` done to lab-check passing "
               f"{time.monotonic() - all_done:.0f}s")
        assert check.returncode == 0, (check.stdout[-4000:], check.stderr[-4000:])
        doc = json.loads(check.stdout)
        assert doc["ok"]
        names = {c["name"]: c for c in doc["checks"]}
        assert {f"names {m}" for m in machines} <= set(names)
        assert names["ensemble"]["detail"].startswith("leader ")
        assert "refused" in names["foreign-ca refused"]["detail"]
        print(check.stderr)
    finally:
        t1 = time.monotonic()
        down = subprocess.run(["vagrant", "destroy", "-f"], cwd=vdir, env=env,
                              capture_output=True, text=True, timeout=900)
        destroy_seconds = time.monotonic() - t1
        left = _lab_state(uri, default_pool, machines, nets)
        # clean up whatever is left before asserting, so a failure leaves nothing behind
        for d in left["domains"]:
            _virsh(uri, "destroy", d)
            _virsh(uri, "undefine", d, "--remove-all-storage")
        for v in left["volumes"]:
            _virsh(uri, "vol-delete", v, "--pool", default_pool)
        for n in left["networks"]:
            _virsh(uri, "net-destroy", n)
            _virsh(uri, "net-undefine", n)
        box_vols = [ln.split()[0] for ln in _virsh(uri, "vol-list", default_pool).stdout
                    .splitlines()[2:] if "vagrant_box_image" in ln]
        for v in box_vols:                       # the box's base volume: vagrant's cache
            _virsh(uri, "vol-delete", v, "--pool", default_pool)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    report(f"kafka lab: vagrant destroy -f {destroy_seconds:.0f}s; left behind: {left}")
    assert left == {"domains": [], "volumes": [], "networks": []}
