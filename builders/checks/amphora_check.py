"""Prove an amphora image: boot it the way Nova would and talk to its agent.

The image boots under QEMU (KVM when it works, else TCG) from a throwaway
qcow2 overlay, with a config drive like Nova's (ISO 9660 labelled
``config-2``; ``openstack/latest/meta_data.json`` whose ``files`` list the
files Octavia injects, their bodies under ``openstack/content/``):

* ``/etc/octavia/amphora-agent.conf`` rendered with the keys of Octavia's
  ``amphora_agent_conf.template``,
* ``/etc/octavia/certs/server.pem``: certificate + key for a test amphora id,
  issued by the Octavia server CA (``builders.artifacts.certs.issue_amphora_cert``),
* ``/etc/octavia/certs/client_ca.pem``: the client CA the agent trusts.

The VM runs under :mod:`builders.tools.qemu_vm` (one NIC on QEMU user
networking, Nova's MAC); the agent port 9443 is forwarded to an ephemeral
port on 127.0.0.1.  The check passes when ``GET /`` answers the agent's API version using
``certs/octavia/client.cert-and-key.pem`` and verifying the agent's
certificate against the server CA chain with the amphora id as host name (as
Octavia's controller does), and when a client certificate from another CA is
refused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path

from builders.core.contract import Check
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools import pki, qemu_vm
from builders.tools.qemu_vm import Drive, Nic, VmSpec

log = logging.getLogger("labforge")

AGENT_PORT = 9443
BOOT_TIMEOUT = 1200.0      # TCG on a shared 2-core machine


# --------------------------------------------------------------------------
# config drive
# --------------------------------------------------------------------------
def agent_conf(lab: Lab, amphora_id: str, heartbeat_key: str) -> str:
    """amphora-agent.conf with the keys of Octavia's template (controller defaults)."""
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
        f"controller_ip_port_list = {', '.join(lab.octavia.health_managers)}",
        "heartbeat_interval = 10",
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


def amphora_vm(image: Path, config_drive_iso: Path, port: int) -> VmSpec:
    """The amphora as Nova boots it: its image (through a throwaway overlay),
    the config drive, one management NIC with the agent port forwarded to
    127.0.0.1:``port``, and a virtio RNG."""
    fmt = "raw" if image.suffix == ".raw" else "qcow2"
    return VmSpec(name="labforge-amphora-check",
                  drives=(Drive(image, fmt, throwaway=True), Drive(config_drive_iso, "raw", cdrom=True)),
                  nics=(Nic.user(mac=MGMT_MAC, forwards=[("tcp", port, AGENT_PORT)]),),
                  memory=1024, cpus=2, cpus_tcg=1, machine="pc", rng=True)


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
    """``invoke amphora-check``: boot the amphora as Nova would, prove its agent."""

    name = "amphora-check"
    help = "boot the amphora with a Nova-style config drive and prove its agent (mutual TLS)"

    def check(self, lab: Lab, ws: Workspace, *, image: str | None = None,
              timeout: float = BOOT_TIMEOUT, accel: str | None = None) -> list[Outcome]:
        return _check_amphora(lab, ws, image=image, timeout=timeout, accel=accel)


AMPHORA_CHECK = AmphoraCheck()


def check_amphora(lab: Lab, ws: Workspace, *, image: str | None = None,
                  timeout: float = BOOT_TIMEOUT, accel: str | None = None) -> list[Outcome]:
    """Boot the amphora with a config drive and prove its agent (see module doc)."""
    return AMPHORA_CHECK.check(lab, ws, image=image, timeout=timeout, accel=accel)


def _check_amphora(lab: Lab, ws: Workspace, *, image: str | None, timeout: float,
                   accel: str | None) -> list[Outcome]:
    from builders.artifacts import certs
    qemu_vm.require_tools()
    path = _image(lab, ws, image)
    outcomes = certs.build_certs(lab, ws)
    cdir = ws.certs / "octavia"
    client_pem = cdir / "client.cert-and-key.pem"
    chain = cdir / "server_ca-chain.cert.pem"
    if not chain.is_file():
        chain = cdir / "server_ca.cert.pem"
    client_ca = (cdir / "client_ca.cert.pem").read_bytes()
    hb_file = cdir / "heartbeat_key"
    heartbeat = hb_file.read_text().strip() if hb_file.is_file() else "labforge-check"
    amphora_id = str(uuid.uuid4())
    cert_pem, key_pem = certs.issue_amphora_cert(lab, ws, amphora_id)
    files = {
        "/etc/octavia/amphora-agent.conf": agent_conf(lab, amphora_id, heartbeat).encode(),
        "/etc/octavia/certs/server.pem": cert_pem + key_pem,
        "/etc/octavia/certs/client_ca.pem": client_ca,
    }
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
