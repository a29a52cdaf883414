"""Prove an amphora image: boot it the way Nova would and use it as Octavia does.

The image boots under QEMU (KVM when it works, else TCG) from a throwaway
qcow2 overlay, with a config drive like Nova's (ISO 9660 labelled
``config-2``; ``openstack/latest/meta_data.json`` whose ``files`` list the
files Octavia injects, their bodies under ``openstack/content/``):

* ``/etc/octavia/amphora-agent.conf`` rendered with the keys of Octavia's
  ``amphora_agent_conf.template``,
* ``/etc/octavia/certs/server.pem``: certificate + key for a test amphora id,
  issued by the Octavia server CA (``builders.artifacts.certs.issue_amphora_cert``),
* ``/etc/octavia/certs/client_ca.pem``: the client CA the agent trusts.

The VM runs under :mod:`builders.tools.qemu_vm`; its management NIC (QEMU
user networking, Nova's MAC) has the agent port 9443 forwarded to an
ephemeral port on 127.0.0.1.

By default (:func:`_check_lb`) the amphora also gets the VIP NIC and sends
its heartbeats to the check, and Octavia's own controller code (run from
``.venv-octavia`` by :class:`amphora_lb.OctaviaDriver`) configures a load
balancer through the agent, which :func:`amphora_lb.prove` then puts to
work.  ``quick`` keeps the agent check alone: ``GET /`` answers the agent's
API version using ``certs/octavia/client.cert-and-key.pem`` and verifying
the agent's certificate against the server CA chain with the amphora id as
host name (as Octavia's controller does).  Both also require that a client
certificate from another CA is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from builders.core.contract import Check
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.checks import amphora_lb
from builders.tools import pki, qemu_vm
from builders.tools.qemu_vm import Drive, Nic, VmSpec

log = logging.getLogger("labforge")

AGENT_PORT = 9443
BOOT_TIMEOUT = 1200.0      # TCG on a shared 2-core machine


# --------------------------------------------------------------------------
# config drive
# --------------------------------------------------------------------------
def agent_conf(lab: Lab, amphora_id: str, heartbeat_key: str, *,
               health_managers: list[str] | None = None, heartbeat_interval: int = 10) -> str:
    """amphora-agent.conf with the keys of Octavia's template (controller defaults;
    ``health_managers``: where heartbeats go, default ``octavia.health_managers``)."""
    return "\n".join([
        "[DEFAULT]",
        "debug = True",
        "use_syslog = True",
        "syslog_log_facility = LOG_LOCAL1",
        "",
        "[haproxy_amphora]",
        "base_cert_dir = /var/lib/octavia/certs",
        "base_path = /var/lib/octavia",
        "bind_host = 0.0.0.0",
        f"bind_port = {AGENT_PORT}",
        "haproxy_cmd = /usr/sbin/haproxy",
        "user_log_facility = 0",
        "administrative_log_facility = 1",
        "",
        "[health_manager]",
        f"controller_ip_port_list = {', '.join(health_managers or lab.octavia.health_managers)}",
        f"heartbeat_interval = {heartbeat_interval}",
        f"heartbeat_key = {heartbeat_key}",
        "",
        "[amphora_agent]",
        "agent_server_ca = /etc/octavia/certs/client_ca.pem",
        "agent_server_cert = /etc/octavia/certs/server.pem",
        "agent_request_read_timeout = 180",
        f"amphora_id = {amphora_id}",
        "amphora_udp_driver = keepalived_lvs",
        "agent_tls_protocol = TLSv1.2",
        "",
        "[controller_worker]",
        "loadbalancer_topology = SINGLE",
        "",
    ])


MGMT_MAC = "fa:16:3e:4c:00:01"     # Nova's MAC prefix; the management port


def network_data() -> dict:
    """Nova's network_data.json for one management port using DHCP (QEMU user net)."""
    return {
        "links": [{"id": "tap-lb-mgmt", "type": "ovs", "vif_id": str(uuid.uuid4()),
                   "ethernet_mac_address": MGMT_MAC, "mtu": 1500}],
        "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": "tap-lb-mgmt",
                      "network_id": str(uuid.uuid4())}],
        "services": [],
    }


def config_drive(path: Path, amphora_id: str, files: dict[str, bytes]) -> Path:
    """Write a Nova-style config drive (ISO 9660 + Rock Ridge + Joliet, label config-2)."""
    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="config-2",
            sys_ident="LINUX", pub_ident_str="labforge")
    dirs = [("/OPENSTAC", "openstack"), ("/OPENSTAC/LATEST", "latest"),
            ("/OPENSTAC/CONTENT", "content")]
    for iso_path, rr in dirs:
        joliet = "/" + "/".join(d[1] for d in dirs[:dirs.index((iso_path, rr)) + 1]
                                if iso_path.startswith(d[0]))
        iso.add_directory(iso_path, rr_name=rr, joliet_path=joliet)
    entries = []
    for i, (dest, data) in enumerate(files.items()):
        name = f"{i:04d}"
        iso.add_fp(io.BytesIO(data), len(data), f"/OPENSTAC/CONTENT/{name}.;1", rr_name=name,
                   joliet_path=f"/openstack/content/{name}")
        entries.append({"path": dest, "content_path": f"/content/{name}"})
    meta = {
        "uuid": amphora_id, "name": f"amphora-{amphora_id}",
        "hostname": f"amphora-{amphora_id[:8]}", "launch_index": 0,
        "availability_zone": "nova", "project_id": "labforge", "meta": {},
        "files": entries,
    }
    for fname, short, body in (("meta_data.json", "META_DAT.JSO;1", meta),
                               ("network_data.json", "NETWORK_.JSO;1", network_data())):
        data = json.dumps(body, indent=1).encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/OPENSTAC/LATEST/{short}", rr_name=fname,
                   joliet_path=f"/openstack/latest/{fname}")
    iso.write(str(path))
    iso.close()
    return path


# --------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def amphora_vm(image: Path, config_drive_iso: Path, port: int, vip_port: int | None = None) -> VmSpec:
    """The amphora as Nova boots it: its image (through a throwaway overlay),
    the config drive, one management NIC with the agent port forwarded to
    127.0.0.1:``port``, and a virtio RNG.  With ``vip_port``: a second NIC on
    the VIP network (:mod:`amphora_lb`), the VIP's port 80 forwarded to
    127.0.0.1:``vip_port``."""
    fmt = "raw" if image.suffix == ".raw" else "qcow2"
    nics = [Nic.user(mac=MGMT_MAC, forwards=[("tcp", port, AGENT_PORT)])]
    if vip_port is not None:
        nics.append(Nic("user", amphora_lb.vip_nic_options(vip_port), amphora_lb.VIP_MAC))
    return VmSpec(name="labforge-amphora-check",
                  drives=(Drive(image, fmt, throwaway=True), Drive(config_drive_iso, "raw", cdrom=True)),
                  nics=tuple(nics), memory=1024, cpus=2, cpus_tcg=1, machine="pc", rng=True)


# --------------------------------------------------------------------------
# TLS client as Octavia's controller
# --------------------------------------------------------------------------
def _session(amphora_id: str):
    import requests
    from requests.adapters import HTTPAdapter

    class AmphoraAdapter(HTTPAdapter):
        """Verify the agent's certificate for the amphora id, not 127.0.0.1."""
        def cert_verify(self, conn, url, verify, cert):
            conn.assert_hostname = amphora_id
            return super().cert_verify(conn, url, verify, cert)

    s = requests.Session()
    s.mount("https://", AmphoraAdapter(max_retries=0))
    return s


def agent_get(port: int, amphora_id: str, client_pem: Path, server_chain: Path,
              timeout: float = 20.0):
    s = _session(amphora_id)
    try:
        return s.get(f"https://127.0.0.1:{port}/", cert=str(client_pem), verify=str(server_chain),
                     timeout=timeout)
    finally:
        s.close()


def foreign_client(directory: Path) -> Path:
    """A client cert+key from a throwaway CA that Octavia never saw (0600)."""
    ca_key, key = pki.new_key("ecdsa"), pki.new_key("ecdsa")
    ca = pki.new_ca(ca_key, pki.name("labforge foreign CA"), days=1)
    cert = pki.issue(ca, ca_key, key, pki.name("octavia-controller"), days=1,
                     eku=(pki.CLIENT_AUTH,))
    return atomic_write(directory / "foreign-client.pem", pki.key_pem(key) + pki.cert_pem(cert),
                        mode=0o600)


# --------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------
def _image(lab: Lab, ws: Workspace, image: str | None) -> Path:
    """``--image`` (a path or a manifest name), else the amphora builder's
    declared output (qcow2, or raw when that is what was built)."""
    from builders.artifacts import amphora
    if image:
        return Manifest(ws.artifacts).resolve(image, kinds=(amphora.KIND,))[0]
    declared = amphora.AMPHORA.outputs(lab, ws)[0].path
    for p in (declared, *(amphora.artifact_path(ws, {"image_type": t}) for t in ("qcow2", "raw"))):
        if p.is_file():
            return p
    raise LabError(f"{declared}: no amphora image; run `invoke build-amphora` first")


class AmphoraCheck(Check):
    """``invoke amphora-check``: boot the amphora as Nova would and prove it
    as a load balancer (``quick``: its agent's mutual TLS alone)."""

    name = "amphora-check"
    help = ("boot the amphora as Nova would and prove it as a load balancer, driven by "
            "Octavia's own controller code (--quick: the agent's mutual TLS alone)")

    def check(self, lab: Lab, ws: Workspace, *, image: str | None = None,
              timeout: float = BOOT_TIMEOUT, accel: str | None = None,
              quick: bool = False) -> list[Outcome]:
        return _check_amphora(lab, ws, image=image, timeout=timeout, accel=accel, quick=quick)


AMPHORA_CHECK = AmphoraCheck()


def check_amphora(lab: Lab, ws: Workspace, *, image: str | None = None,
                  timeout: float = BOOT_TIMEOUT, accel: str | None = None,
                  quick: bool = False) -> list[Outcome]:
    """Boot the amphora with a config drive and prove it (see module doc)."""
    return AMPHORA_CHECK.check(lab, ws, image=image, timeout=timeout, accel=accel, quick=quick)


@dataclass(frozen=True)
class Controller:
    """What the controller side holds: the lab's Octavia certificate set."""
    client_pem: Path        # [haproxy_amphora] client_cert (cert + key)
    server_ca: Path         # [haproxy_amphora] server_ca (chain)
    client_ca: bytes        # what the amphora gets as client_ca.pem
    heartbeat_key: str
    heartbeat_key_file: Path


def controller(lab: Lab, ws: Workspace) -> Controller:
    cdir = ws.certs / "octavia"
    chain = cdir / "server_ca-chain.cert.pem"
    if not chain.is_file():
        chain = cdir / "server_ca.cert.pem"
    hb_file = cdir / "heartbeat_key"
    if not hb_file.is_file():
        raise LabError(f"{hb_file}: missing; run `invoke certs`")
    return Controller(cdir / "client.cert-and-key.pem", chain,
                      (cdir / "client_ca.cert.pem").read_bytes(),
                      hb_file.read_text().strip(), hb_file)


def amphora_files(lab: Lab, ws: Workspace, amphora_id: str, heartbeat_key: str, *,
                  client_ca: bytes, server_pem: bytes | None = None,
                  health_managers: list[str] | None = None,
                  heartbeat_interval: int = 10) -> dict[str, bytes]:
    """The files Octavia's controller injects through the config drive
    (``server_pem``: cert + key; default: issued for ``amphora_id`` by the
    lab's Octavia server CA)."""
    from builders.artifacts import certs
    if server_pem is None:
        cert_pem, key_pem = certs.issue_amphora_cert(lab, ws, amphora_id)
        server_pem = cert_pem + key_pem
    return {
        "/etc/octavia/amphora-agent.conf": agent_conf(
            lab, amphora_id, heartbeat_key, health_managers=health_managers,
            heartbeat_interval=heartbeat_interval).encode(),
        "/etc/octavia/certs/server.pem": server_pem,
        "/etc/octavia/certs/client_ca.pem": client_ca,
    }


def _check_amphora(lab: Lab, ws: Workspace, *, image: str | None, timeout: float,
                   accel: str | None, quick: bool = False) -> list[Outcome]:
    from builders.artifacts import certs
    qemu_vm.require_tools()
    path = _image(lab, ws, image)
    if not quick:
        amphora_lb.driver_python()         # before anything is built or booted
    outcomes = certs.build_certs(lab, ws)
    ctl = controller(lab, ws)
    if not quick:
        return outcomes + [_check_lb(lab, ws, path, ctl, timeout=timeout, accel=accel)]
    amphora_id = str(uuid.uuid4())
    files = amphora_files(lab, ws, amphora_id, ctl.heartbeat_key, client_ca=ctl.client_ca)
    client_pem, chain = ctl.client_pem, ctl.server_ca
    console = ws.artifact_dir("logs") / "amphora-check-console.log"
    # the config drive holds a private key: build it in a private temp dir
    with tempfile.TemporaryDirectory(prefix="amphora-check.", dir=ws.cache_dir()) as td:
        tdp = Path(td)
        os.chmod(tdp, 0o700)
        iso = config_drive(tdp / "config-2.iso", amphora_id, files)
        foreign = foreign_client(tdp)
        port = free_port()
        probe = _AgentProbe(port, amphora_id, client_pem, chain, foreign)

        def too_late(vm: qemu_vm.Vm, limit: float) -> LabError:
            return LabError(f"amphora-check: the agent did not answer on 127.0.0.1:{port} "
                            f"within {limit:.0f}s ({probe.last_err}); console: {vm.console}",
                            qemu_vm.tail(vm.text(), 10))

        watch = qemu_vm.Watch(probe, waiting_for="the agent answered", stage=_stage,
                              timeout_error=too_late, interval=3.0)
        booted = qemu_vm.boot(amphora_vm(path, iso, port), watch, what="amphora-check",
                              console=console, timeout=timeout, accel=accel, ws=ws, workdir=tdp)
    version, refused = booted.result
    return outcomes + [Outcome(
        "amphora-check", "passed", [path],
        detail=f"{path.name}: agent API {version} answered over mutual TLS after "
               f"{booted.seconds:.0f}s ({booted.accel.upper()} boot); a client certificate from "
               f"another CA was refused ({refused})",
        seconds=booted.seconds)]


# --------------------------------------------------------------------------
# the full check: a load balancer, driven by Octavia's controller code
# --------------------------------------------------------------------------
def _octavia_release(ws: Workspace, path: Path) -> str | None:
    """The Octavia release the image's agent was built from (its manifest record)."""
    with contextlib.suppress(Exception):
        rec = Manifest(ws.artifacts).get(path)
        if rec:
            return (rec.get("meta") or {}).get("octavia_version")
    return None


def start_driver(ws: Workspace, ctl: Controller, amphora_id: str, agent_port: int, *,
                 heartbeat_port: int = 0, server_ca: Path | None = None,
                 heartbeat_key: str | None = None) -> tuple[amphora_lb.OctaviaDriver, dict]:
    """Octavia's controller side (a started :class:`amphora_lb.OctaviaDriver`,
    configured with the lab's certificates and heartbeat key) and its answer."""
    drv = amphora_lb.OctaviaDriver(ws.artifact_dir("logs") / "amphora-check-octavia.log")
    drv.__enter__()
    try:
        conf = drv.call("configure", client_cert=str(ctl.client_pem),
                        server_ca=str(server_ca or ctl.server_ca), agent_port=agent_port,
                        amphora_id=amphora_id, heartbeat_port=heartbeat_port,
                        heartbeat_key=heartbeat_key if heartbeat_key is not None else ctl.heartbeat_key,
                        timeout=120)
    except BaseException:
        drv.close()
        raise
    return drv, conf


def agent_version(drv: amphora_lb.OctaviaDriver, ca: Path) -> str | None:
    """``GET /`` through Octavia's client: the API version, None while the
    agent is not up yet, LabError when TLS gave a verdict."""
    ans = drv.ask("version", timeout=60)
    if ans.get("ok"):
        return ans["api_version"]
    if ans.get("retry"):
        drv.last_err = ans.get("error", "")
        return None
    raise LabError(f"amphora-check: {ans.get('error')} (the controller's server CA: {ca})")


class _LbProbe:
    """Once the agent answers Octavia's client: the load-balancer sequence."""

    def __init__(self, drv, ctl: Controller, amphora_id: str, agent_port: int, vip_port: int,
                 hb_port: int, backends: list, foreign: Path, report: amphora_lb.Report):
        self.drv, self.ctl, self.amphora_id = drv, ctl, amphora_id
        self.agent_port, self.vip_port, self.hb_port = agent_port, vip_port, hb_port
        self.backends, self.foreign, self.report = backends, foreign, report
        drv.last_err = "no answer yet"

    def __call__(self, vm: qemu_vm.Vm):
        if not qemu_vm.kernel_started(vm.text()):
            return None
        version = agent_version(self.drv, self.ctl.server_ca)
        if version is None:
            return None
        self.report.api_version = version
        self.report.agent_s = vm.elapsed
        self.report.started = time.time() - vm.elapsed
        amphora_lb.prove(self.drv, amphora_id=self.amphora_id, vip_port=self.vip_port,
                         hb_port=self.hb_port, key_file=str(self.ctl.heartbeat_key_file),
                         backends=self.backends, report=self.report)
        self.report.foreign_client = _foreign_refused(self.agent_port, self.amphora_id,
                                                      self.foreign, self.ctl.server_ca,
                                                      self.ctl.client_pem)
        return self.report


def _check_lb(lab: Lab, ws: Workspace, path: Path, ctl: Controller, *, timeout: float,
              accel: str | None) -> Outcome:
    amphora_id = str(uuid.uuid4())
    agent_port, vip_port = free_port(), free_port()
    logs = ws.artifact_dir("logs")
    console = logs / "amphora-check-console.log"
    with contextlib.ExitStack() as stack:
        drv, conf = start_driver(ws, ctl, amphora_id, agent_port)
        stack.callback(drv.close)
        built_from = _octavia_release(ws, path)
        if built_from and built_from != conf["octavia"]:
            raise LabError(f"amphora-check: {path.name} has the agent of Octavia {built_from}, "
                           f".venv-octavia has Octavia {conf['octavia']}; run "
                           f"`OCTAVIA_VERSION={built_from} bash scripts/setup.d/octavia.sh`")
        hb_port = conf["heartbeat_port"]
        backends = [amphora_lb.Backend("member-1"), amphora_lb.Backend("member-2")]
        for b in backends:
            stack.callback(b.stop)
        files = amphora_files(lab, ws, amphora_id, ctl.heartbeat_key, client_ca=ctl.client_ca,
                              health_managers=[f"{amphora_lb.HEALTH_MANAGER_IP}:{hb_port}"],
                              heartbeat_interval=amphora_lb.HEARTBEAT_INTERVAL)
        # the config drive holds a private key: build it in a private temp dir
        tdp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amphora-check.",
                                                                   dir=ws.cache_dir())))
        os.chmod(tdp, 0o700)
        iso = config_drive(tdp / "config-2.iso", amphora_id, files)
        foreign = foreign_client(tdp)
        report = amphora_lb.Report(amphora_id, octavia=conf["octavia"])
        probe = _LbProbe(drv, ctl, amphora_id, agent_port, vip_port, hb_port, backends, foreign,
                         report)

        def too_late(vm: qemu_vm.Vm, limit: float) -> LabError:
            return LabError(f"amphora-check: the agent did not answer Octavia's client on "
                            f"127.0.0.1:{agent_port} within {limit:.0f}s ({drv.last_err}); "
                            f"console: {vm.console}", qemu_vm.tail(vm.text(), 10))

        watch = qemu_vm.Watch(probe, waiting_for="the agent answered", stage=_stage,
                              timeout_error=too_late, interval=3.0)
        booted = qemu_vm.boot(amphora_vm(path, iso, agent_port, vip_port), watch,
                              what="amphora-check", console=console, timeout=timeout,
                              accel=accel, ws=ws, workdir=tdp)
    report.accel = booted.accel
    lines = report.lines()
    atomic_write(logs / "amphora-check-report.txt", ("\n".join(lines) + "\n").encode())
    for line in lines:
        log.info("amphora-check: %s", line.strip())
    return Outcome(
        "amphora-check", "passed", [path],
        detail=f"{path.name}: a load balancer driven by Octavia {report.octavia}'s controller code: "
               f"{report.counts(report.balanced)} alternating; member-2 reported DOWN "
               f"{report.member_down_s:.0f}s after it stopped, then only member-1; heartbeats "
               f"verified, another key rejected; foreign client refused ({report.foreign_client}); "
               f"agent after {report.agent_s:.0f}s ({booted.accel.upper()} boot)",
        seconds=booted.seconds)


class _AgentProbe:
    """Once the guest kernel runs: ask the agent for its API version as the
    controller would; when it answers, check that a foreign client is refused."""

    def __init__(self, port, amphora_id, client_pem, chain, foreign):
        self.port, self.amphora_id = port, amphora_id
        self.client_pem, self.chain, self.foreign = client_pem, chain, foreign
        self.last_err = "no answer yet"

    def __call__(self, vm: qemu_vm.Vm):
        import requests
        if not qemu_vm.kernel_started(vm.text()):
            return None
        try:
            resp = agent_get(self.port, self.amphora_id, self.client_pem, self.chain, timeout=15)
        except requests.exceptions.SSLError as exc:
            # the agent answered TLS but we refused it: that is a failure
            # unless the port is still the QEMU forwarder without a listener
            self.last_err = f"TLS: {_short(exc)}"
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "hostname" in str(exc):
                raise LabError(f"amphora-check: the agent's certificate did not verify "
                               f"against {self.chain.name} for {self.amphora_id}: {_short(exc)}") from None
            return None
        except requests.RequestException as exc:
            self.last_err = _short(exc)
            return None
        if resp.status_code != 200:
            raise LabError(f"amphora-check: GET / answered HTTP {resp.status_code}: "
                           f"{resp.text[:200]}")
        try:
            version = resp.json()["api_version"]
        except (ValueError, KeyError, TypeError):
            raise LabError(f"amphora-check: GET / did not answer the agent's API "
                           f"versions: {resp.text[:200]!r}") from None
        refused = _foreign_refused(self.port, self.amphora_id, self.foreign, self.chain,
                                   self.client_pem)
        return version, refused


def _foreign_refused(port, amphora_id, foreign, chain, client_pem) -> str:
    """How the agent refused a client certificate of another CA.

    A closed connection counts only if the agent still answers the right
    certificate afterwards (a guest that died would refuse everyone).
    """
    import requests
    try:
        resp = agent_get(port, amphora_id, foreign, chain, timeout=15)
    except requests.exceptions.SSLError as exc:
        m = re.search(r"\[SSL: ([A-Z0-9_]+)\]", str(exc))
        how = f"TLS alert {m.group(1).lower()}" if m else f"TLS error: {_short(exc)[:80]}"
    except requests.exceptions.ConnectionError as exc:
        how = f"connection closed: {_short(exc)[:80]}"
    else:
        raise LabError(f"amphora-check: the agent accepted a client certificate from a foreign CA "
                       f"(HTTP {resp.status_code}); its client_ca.pem is not enforced")
    try:
        ok = agent_get(port, amphora_id, client_pem, chain, timeout=15).status_code == 200
    except requests.RequestException:
        ok = False
    if not ok:
        raise LabError("amphora-check: after refusing the foreign client certificate the agent "
                       f"no longer answers the controller's ({how}); see the console log")
    return how


def _short(exc: Exception) -> str:
    text = str(exc)
    for marker in ("SSLError(", "NewConnectionError(", "ProtocolError("):
        if marker in text:
            text = text[text.index(marker):]
    return text.replace("\n", " ")[:160]


def _stage(text: str) -> str:
    for needle, label in (("amphora-agent", "amphora agent"),
                          ("Cloud-init", "cloud-init"), ("cloud-init", "cloud-init"),
                          ("Reached target", "systemd"), ("Linux version", "kernel"),
                          ("GRUB", "bootloader"), ("SeaBIOS", "firmware")):
        if needle in text[-4000:]:
            return label
    return "starting"
