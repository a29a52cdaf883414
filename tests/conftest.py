"""Shared fixtures: an isolated workspace, the default lab, and the CLI.

Helper functions (ROOT, sh, make_qcow2, lab variants, snapshots, the
one-line error assertion) are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from builders.core import lab as labmod
from builders.core.workspace import Workspace
from helpers import INVOKE, ROOT
from openstack_services import openstack_services  # noqa: F401 (session fixture for main_job)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_published_artifacts(tmp_path_factory):
    """After the whole run: no workspace any test built has a private key,
    keystore or one of its lab's secrets under artifacts/ (what CI publishes)."""
    yield
    from secret_scan import scan, secrets_of
    base = tmp_path_factory.getbasetemp()
    problems = []
    for manifest in base.glob("**/artifacts/manifest.json"):
        art = manifest.parent
        problems += [f"{art}/{p}" for p in scan(art, secrets_of(art.parent / "certs"))]
    assert not problems, "secrets in published artifacts:\n" + "\n".join(problems)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """An empty workspace (certs/, artifacts/, cache/) in a temp dir."""
    return Workspace(tmp_path / "ws")


@pytest.fixture
def default_lab() -> labmod.Lab:
    return labmod.load(ROOT / "lab.yaml")


def cli_in(ws: Workspace):
    """A function that runs `invoke ARGS...` as a user would, in workspace ``ws``."""
    def run(*args: str, env: dict | None = None, check: bool | None = None,
            timeout: float = 1800) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, LABFORGE_WORKDIR=str(ws.root))
        full_env.update(env or {})
        proc = subprocess.run([*INVOKE, *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout)
        if check is True:
            assert proc.returncode == 0, proc.stderr
        return proc
    return run


@pytest.fixture
def cli(ws: Workspace):
    """Run `invoke ARGS...` as a user would, in the test's workspace."""
    return cli_in(ws)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory, openstack_services):
    """The README's main job, once per session: `invoke all --json` of the
    default lab in its own workspace, publishing to the session's Keystone +
    Glance, then once more (everything must be up to date).  The main-job
    test checks both; the Kafka lab's acceptance test boots what it built
    (the base image is built once per run)."""
    import time
    from types import SimpleNamespace
    if not openstack_services.glance.running:
        openstack_services.start_glance()
    ws = Workspace(tmp_path_factory.mktemp("main-job") / "ws")
    env = {k: "" for k in os.environ if k.startswith("OS_")}
    env.update(openstack_services.os_env(), OS_CLIENT_CONFIG_FILE=str(ws.root / "no-clouds.yaml"))
    run = cli_in(ws)
    first = run("all", "--json", env=env, timeout=3600)
    done = time.monotonic()
    # the second run belongs to the job, before any test changes the workspace
    # (the Kafka lab test re-renders the Vagrantfile for its smaller brokers)
    second = run("all", "--json", env=env, timeout=600) if first.returncode == 0 else None
    return SimpleNamespace(ws=ws, env=env, cli=run, first=first,
                           second=second, second_wall=time.monotonic() - done,
                           services=openstack_services)


@pytest.fixture
def report(capsys):
    """Show a measurement in the test log, also when the test passes (CI logs
    keep the timings the docs quote; no test asserts a time)."""
    def show(text: str) -> None:
        with capsys.disabled():
            print(f"\n[measured] {text.strip()}")
    return show


@pytest.fixture(scope="session")
def amphora_build(tmp_path_factory):
    """`invoke build-amphora` once per session, cold (a fresh workspace and
    cache), shared by the slow tests that boot it: an image is never built
    twice in one run.  ``seconds``: the build's wall time."""
    import time
    from types import SimpleNamespace
    from builders.artifacts import amphora
    ws = Workspace(tmp_path_factory.mktemp("amphora") / "ws")
    lab = labmod.load(ROOT / "lab.yaml")
    t0 = time.monotonic()
    outcomes = amphora.build_amphora(lab, ws)
    return SimpleNamespace(lab=lab, ws=ws, outcomes=outcomes, seconds=time.monotonic() - t0)


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP image mirror on 127.0.0.1 (Range support, can drop a transfer once)."""
    from imagetools import Mirror
    root = tmp_path / "mirror"
    root.mkdir()
    srv = Mirror(root)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    """The URI of a libvirt daemon for system domains and networks, started
    once a session: the system one when it answers, else one started here
    with its sockets in a temp dir (and virtlogd beside it)."""
    for tool in ("virsh", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/packages/vagrant.test)")
    probe = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode == 0:
        yield "qemu:///system"
        return
    d = tmp_path_factory.mktemp("libvirtd")
    sock = d / "sock"
    sock.mkdir()
    # QEMU's console goes through virtlogd, which systemd's socket starts on a
    # normal host; here it is started with libvirtd (and stopped with it)
    logd = None
    if not Path("/run/libvirt/virtlogd-sock").exists():
        logd = subprocess.Popen(["virtlogd"], stdout=open(d / "virtlogd.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(120):
            if Path("/run/libvirt/virtlogd-sock").exists() or logd.poll() is not None:
                break
            time.sleep(0.25)
    conf = d / "libvirtd.conf"
    conf.write_text(f'unix_sock_dir = "{sock}"\nlisten_tls = 0\nlisten_tcp = 0\n')
    log = open(d / "libvirtd.log", "wb")
    proc = subprocess.Popen(["libvirtd", "--config", str(conf), "--pid-file", str(d / "pid")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"qemu+unix:///system?socket={sock}/libvirt-sock"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            if subprocess.run(["virsh", "-c", uri, "version"], capture_output=True,
                              timeout=60).returncode == 0:
                break
            time.sleep(0.25)
        if proc.poll() is not None:
            pytest.fail("libvirtd did not start: "
                        + (d / "libvirtd.log").read_text(errors="replace")[-2000:])
        yield uri
    finally:
        for p in (proc, logd):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log.close()
