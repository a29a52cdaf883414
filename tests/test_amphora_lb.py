"""amphora-check as a load balancer: Octavia's controller code against the agent.

Fast tests run Octavia's controller side (.venv-octavia) against the
amphora agent's own server and heartbeat code on the host; the slow test
boots the built amphora once and shows the check failing with one line for
a server certificate from another CA, a heartbeat key that is not the lab's
and a member that never answers.  The full passing check runs in
test_amphora.py's build test, on the same build.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from builders.artifacts import certs
from builders.checks import amphora_check, amphora_lb
from builders.core.errors import LabError
from builders.tools import pki

HOST_AGENT = Path(__file__).resolve().parent / "octavia_agent_host.py"

needs_octavia = pytest.mark.skipif(
    not (amphora_lb.OCTAVIA_VENV / "bin" / "python").is_file(),
    reason=".venv-octavia missing: run bash scripts/setup.d/octavia.sh")


def _one_line(err: LabError, *needles: str) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.startswith("amphora-check: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _free_port() -> int:
    return amphora_check.free_port()


def _agent_conf(tmp: Path, amphora_id: str, *, port: int = 9443, key: str = "k",
                hb: str = "127.0.0.1:9") -> Path:
    base = tmp / "var-lib-octavia"
    base.mkdir(exist_ok=True)
    conf = tmp / "amphora-agent.conf"
    conf.write_text("\n".join([
        "[haproxy_amphora]", "bind_host = 127.0.0.1", f"bind_port = {port}",
        f"base_path = {base}", f"base_cert_dir = {base}/certs",
        "[health_manager]", f"controller_ip_port_list = {hb}", f"heartbeat_key = {key}",
        "heartbeat_interval = 1",
        "[amphora_agent]", f"amphora_id = {amphora_id}",
        f"agent_server_cert = {tmp / 'server.pem'}", f"agent_server_ca = {tmp / 'client_ca.pem'}",
        "[controller_worker]", "loadbalancer_topology = SINGLE", ""]))
    conf.chmod(0o600)
    return conf


def _children() -> set[str]:
    """Live child processes of this test process (QEMU, Octavia's driver, ...;
    the session's services too: compare with a snapshot taken before)."""
    me, out = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.append(stat.parent.name)
    return set(out)


def _octavia_py() -> str:
    return str(amphora_lb.OCTAVIA_VENV / "bin" / "python")


# --------------------------------------------------------------------------
# fast: pieces
# --------------------------------------------------------------------------
def test_agent_conf_sends_heartbeats_to_the_check(default_lab):
    text = amphora_check.agent_conf(default_lab, "a1", "hb", health_managers=["10.0.2.2:4242"],
                                    heartbeat_interval=3)
    assert "controller_ip_port_list = 10.0.2.2:4242\n" in text
    assert "heartbeat_interval = 3\n" in text
    assert "controller_ip_port_list = 10.100.0.5:5555" in amphora_check.agent_conf(default_lab, "a", "h")


def test_the_vm_has_a_vip_nic_with_the_vip_forwarded(tmp_path):
    from builders.tools import qemu_vm
    spec = amphora_check.amphora_vm(tmp_path / "a.qcow2", tmp_path / "cd.iso", 4001, 4002)
    argv = " ".join(qemu_vm.qemu_argv(spec, "tcg", tmp_path / "c.log", tmp_path / "pid"))
    assert "hostfwd=tcp:127.0.0.1:4001-:9443" in argv
    assert f"net=10.0.3.0/24,hostfwd=tcp:127.0.0.1:4002-{amphora_lb.VIP}:80" in argv
    assert f"mac={amphora_lb.VIP_MAC}" in argv and f"mac={amphora_check.MGMT_MAC}" in argv
    quick = " ".join(qemu_vm.qemu_argv(amphora_check.amphora_vm(tmp_path / "a.qcow2",
                                                                 tmp_path / "cd.iso", 4001),
                                       "tcg", tmp_path / "c.log", tmp_path / "pid"))
    assert amphora_lb.VIP_MAC not in quick


def test_round_robin_must_alternate():
    assert amphora_lb.alternating(["a", "b", "a", "b"])
    assert not amphora_lb.alternating(["a", "b", "b", "a"])


def test_backends_answer_their_name_and_stop_refusing():
    b = amphora_lb.Backend("member-9")
    try:
        assert amphora_lb.get(b.port) == "member-9"
    finally:
        b.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", b.port), timeout=5)


def test_without_the_octavia_venv_one_line_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(amphora_lb, "OCTAVIA_VENV", tmp_path / ".venv-octavia")
    with pytest.raises(LabError) as err:
        amphora_lb.driver_python()
    _one_line(err.value, ".venv-octavia", "scripts/setup.sh", "--quick")


# --------------------------------------------------------------------------
# fast: Octavia's controller code (.venv-octavia) against the agent's own code
# --------------------------------------------------------------------------
@pytest.fixture
def lab_certs(default_lab, ws):
    certs.build_certs(default_lab, ws)
    return amphora_check.controller(default_lab, ws)


@pytest.mark.integration
@needs_octavia
def test_octavia_renders_the_listener_the_controller_would(default_lab, ws, lab_certs):
    drv, conf = amphora_check.start_driver(ws, lab_certs, str(uuid.uuid4()), _free_port())
    try:
        assert conf["octavia"] == default_lab.octavia.amphora.octavia_version
        out = drv.call("render", vip=amphora_lb.VIP, vrrp_ip=amphora_lb.VIP_VRRP_IP, port=80,
                       haproxy_version="2.6.12-1+deb12u1", health_monitor=amphora_lb.HM,
                       members=[{"name": "member-1", "address": "10.0.3.2", "port": 8081},
                                {"name": "member-2", "address": "10.0.3.2", "port": 8082}])
    finally:
        drv.close()
    cfg = out["haproxy_cfg"]
    assert f"frontend {out['listener']}" in cfg and f"bind {amphora_lb.VIP}:80" in cfg
    assert "balance roundrobin" in cfg and "option httpchk GET /" in cfg
    for m, port in zip(out["members"], (8081, 8082)):
        assert f"server {m['id']} 10.0.3.2:{port} weight 1 check inter 2s fall 2 rise 1" in cfg
    assert f"stats socket /var/lib/octavia/{out['load_balancer']}.sock" in cfg


def _serve_agent(tmp_path: Path, amphora_id: str, server_pem: bytes, client_ca: bytes):
    (tmp_path / "server.pem").write_bytes(server_pem)
    (tmp_path / "server.pem").chmod(0o600)
    (tmp_path / "client_ca.pem").write_bytes(client_ca)
    port = _free_port()
    conf = _agent_conf(tmp_path, amphora_id, port=port)
    proc = subprocess.Popen([_octavia_py(), str(HOST_AGENT), "serve", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    raise AssertionError((tmp_path / "agent.log").read_text())


def _foreign_server_pem(amphora_id: str) -> tuple[bytes, bytes]:
    """(CA certificate, server cert + key for the amphora id) of a CA the lab never saw."""
    ca_key, key = pki.new_key("ecdsa"), pki.new_key("ecdsa")
    ca = pki.new_ca(ca_key, pki.name("another Octavia server CA"), days=1)
    cert = pki.issue(ca, ca_key, key, pki.name(amphora_id), 1, [amphora_id],
                     [pki.SERVER_AUTH, pki.CLIENT_AUTH])
    return pki.cert_pem(ca), pki.cert_pem(cert) + pki.key_pem(key)


def _version(drv, ca, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = amphora_check.agent_version(drv, ca)
        if v is not None:
            return v
        time.sleep(0.5)
    raise AssertionError(f"no verdict within {limit}s: {drv.last_err}")


@pytest.mark.integration
@needs_octavia
@pytest.mark.parametrize("issuer", ["lab", "another CA"])
def test_agent_server_certificate(default_lab, ws, lab_certs, tmp_path, issuer):
    """The agent's own TLS server (gunicorn with octavia-agent's options)
    against Octavia's REST client: the lab's amphora certificate (SAN = the
    amphora id) is accepted, one from another CA is one clear line."""
    amphora_id = str(uuid.uuid4())
    if issuer == "lab":
        cert, key = certs.issue_amphora_cert(default_lab, ws, amphora_id)
        pem = cert + key
    else:
        pem = _foreign_server_pem(amphora_id)[1]
    before = _children()
    proc, port = _serve_agent(tmp_path, amphora_id, pem, lab_certs.client_ca)
    drv, _ = amphora_check.start_driver(ws, lab_certs, amphora_id, port)
    try:
        if issuer == "lab":
            assert _version(drv, lab_certs.server_ca) == "1.0"
        else:
            with pytest.raises(LabError) as err:
                _version(drv, lab_certs.server_ca)
            _one_line(err.value, "server certificate does not verify against the lab's server CA",
                      str(lab_certs.server_ca))
    finally:
        drv.close()
        proc.terminate()
        proc.wait(timeout=30)
    assert _children() <= before         # the driver process is gone with close()


@pytest.mark.integration
@needs_octavia
def test_heartbeats_verify_only_with_the_labs_key(default_lab, ws, lab_certs, tmp_path):
    """The agent's health daemon code sends; Octavia's unwrap_envelope checks."""
    amphora_id = str(uuid.uuid4())
    drv, conf = amphora_check.start_driver(ws, lab_certs, amphora_id, _free_port())
    hb = f"127.0.0.1:{conf['heartbeat_port']}"
    try:
        good = _agent_conf(tmp_path, amphora_id, key=lab_certs.heartbeat_key, hb=hb)
        subprocess.run([_octavia_py(), str(HOST_AGENT), "beat", str(good), "2"], check=True,
                       capture_output=True, timeout=120)
        beats, rejected = amphora_lb.wait_first_heartbeat(drv, amphora_id, conf["heartbeat_port"],
                                                          "certs/octavia/heartbeat_key", limit=30)
        assert rejected == 0 and beats[0]["id"] == amphora_id and beats[0]["listeners"] == {}
        wk = drv.call("wrong_key", key="not-the-key")
        assert wk["rejected"] and wk["exception"] == "InvalidHMACException"

        drv.call("heartbeats")              # drain
        other = _agent_conf(tmp_path, amphora_id, key="another-key", hb=hb)
        subprocess.run([_octavia_py(), str(HOST_AGENT), "beat", str(other), "3"], check=True,
                       capture_output=True, timeout=120)
        with pytest.raises(LabError) as err:
            amphora_lb.wait_first_heartbeat(drv, amphora_id, conf["heartbeat_port"],
                                            str(lab_certs.heartbeat_key_file), limit=30)
        msg = _one_line(err.value, "do not verify with the lab's heartbeat key",
                        "InvalidHMACException")
        assert lab_certs.heartbeat_key not in msg and "another-key" not in msg
    finally:
        drv.close()


# --------------------------------------------------------------------------
# slow: one boot of the built amphora, three failures the check must name
# --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
@needs_octavia
def test_one_boot_three_faults(amphora_build, tmp_path, report):
    """The amphora is given a server certificate from another CA and a
    heartbeat key that is not the lab's.  With the lab's controller settings
    the check stops at the certificate; a controller trusting that CA stops at
    the heartbeat key; one that also has the amphora's key stops at a member
    that never answers (reported DOWN).  Each is one line, none hangs."""
    from builders.tools import qemu_vm
    lab, ws = amphora_build.lab, amphora_build.ws
    certs.build_certs(lab, ws)
    ctl = amphora_check.controller(lab, ws)
    amphora_id = str(uuid.uuid4())
    other_ca_pem, other_pem = _foreign_server_pem(amphora_id)
    other_ca = tmp_path / "other-server-ca.pem"
    other_ca.write_bytes(other_ca_pem)
    other_key = "amphora-key-" + uuid.uuid4().hex
    hb_port = amphora_check.free_udp_port()
    agent_port, vip_port = _free_port(), _free_port()
    files = amphora_check.amphora_files(
        lab, ws, amphora_id, other_key, client_ca=ctl.client_ca, server_pem=other_pem,
        health_managers=[f"{amphora_lb.HEALTH_MANAGER_IP}:{hb_port}"],
        heartbeat_interval=amphora_lb.HEARTBEAT_INTERVAL)
    iso = amphora_check.config_drive(tmp_path / "config-2.iso", amphora_id, files)
    image = ws.artifacts / "images" / "amphora-x64-haproxy.qcow2"
    errors: dict[str, str] = {}
    live = [amphora_lb.Backend("member-1"), amphora_lb.Backend("member-2")]
    dead = amphora_lb.Backend("member-2")
    dead.stop()                         # its port is closed: it never answers
    before = _children()
    lab_ctl, _ = amphora_check.start_driver(ws, ctl, amphora_id, agent_port)

    def rounds(vm):
        if not qemu_vm.kernel_started(vm.text()):
            return None
        try:                              # (a) the lab's controller
            if amphora_check.agent_version(lab_ctl, ctl.server_ca) is None:
                return None
            errors["a"] = "accepted"
        except LabError as exc:
            errors["a"] = str(exc)
        for case, key, backends in (("b", None, live), ("c", other_key, [live[0], dead])):
            drv, _ = amphora_check.start_driver(ws, ctl, amphora_id, agent_port,
                                                heartbeat_port=hb_port, server_ca=other_ca,
                                                heartbeat_key=key)
            t0 = time.monotonic()
            try:
                assert _version(drv, other_ca) == "1.0"
                amphora_lb.prove(drv, amphora_id=amphora_id, vip_port=vip_port, hb_port=hb_port,
                                 key_file=str(ctl.heartbeat_key_file), backends=backends,
                                 report=amphora_lb.Report(amphora_id))
                errors[case] = "passed"
            except LabError as exc:
                errors[case] = f"{exc} [{time.monotonic() - t0:.0f}s]"
            finally:
                drv.close()
        return errors

    try:
        booted = qemu_vm.boot(amphora_check.amphora_vm(image, iso, agent_port, vip_port),
                              qemu_vm.Watch(rounds, waiting_for="the agent answered", interval=3.0),
                              what="amphora-check faults", console=tmp_path / "console.log",
                              timeout=amphora_check.BOOT_TIMEOUT, ws=ws, workdir=tmp_path)
    finally:
        lab_ctl.close()
        for b in live:
            b.stop()
    assert _children() <= before, "QEMU or an Octavia driver process is still running"
    assert not list(tmp_path.glob("labforge-amphora-check.*")), "the VM's work directory is left"
    report(f"amphora-check faults on one boot ({booted.accel}; QEMU start to the last verdict "
           f"{booted.seconds:.0f}s):\n"
           + "\n".join(f"  ({k}) {v}" for k, v in sorted(errors.items())))
    for case, needles in (("a", ["server certificate does not verify against the lab's server CA"]),
                          ("b", ["do not verify with the lab's heartbeat key", "InvalidHMACException"]),
                          ("c", ["member-2 (10.0.3.2:", "is DOWN", "never answered"])):
        msg = errors[case].rsplit(" [", 1)[0]
        assert "\n" not in msg and msg.startswith("amphora-check: "), (case, msg)
        for n in needles:
            assert n in msg, (case, n, msg)
    assert other_key not in " ".join(errors.values())
