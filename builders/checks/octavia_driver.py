"""Octavia's controller side, for amphora-check: runs INSIDE .venv-octavia.

This file is a standalone program (stdlib + the installed ``octavia``
release; it never imports labforge, and labforge never imports it).
``builders.checks.amphora_check`` starts it with ``.venv-octavia/bin/python``
and talks to it with one JSON object per line: a request on stdin
(``{"op": ..., ...}``), one answer on stdout (``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "retry": bool}``).  Secrets (the heartbeat
key) only ever travel on stdin; Octavia's own log lines go to stderr (they
name hashes, never the key).

Every step is Octavia's code, used as its controller uses it:

* ``configure``: ``octavia.common.config`` registers the options; the
  ``[haproxy_amphora]`` client certificate, server CA and agent port are set
  with ``CONF.set_override`` before the REST client is built (it reads the
  client certificate when constructed); a UDP socket starts receiving
  heartbeats.
* ``version``: ``AmphoraAPIClientBase.get_api_version`` (``GET /``) with
  ``raise_retry_exception``, as the controller's compute-wait task polls a
  booting amphora; a TLS failure that is a verdict (certificate from another
  CA, wrong host name, client certificate refused) is an error, a refused or
  reset connection is "retry".
* ``info``: ``AmphoraAPIClient1_0.get_info`` and ``get_details``.
* ``plug_vip``: ``net_info`` built by the REST driver's ``_build_net_info``
  from a port, amphora and subnet as Neutron describes them, sent with
  ``plug_vip`` (a 409 "already plugged" is accepted, as the driver does).
* ``load_balancer`` (``render`` without the agent): Octavia data models (LoadBalancer + Vip, Listener,
  Pool with ROUND_ROBIN, two Members, an HTTP HealthMonitor) rendered by the
  combined-listeners ``JinjaTemplater`` with the agent's HAProxy version and
  details, then ``upload_config`` and ``reload_listener`` (the agent starts
  an HAProxy that is not running), the sequence of the driver's
  ``update_amphora_listeners``.
* ``heartbeats``: what the receiver thread got: every datagram goes through
  ``status_message.unwrap_envelope`` with the lab's key, as the health
  manager's ``UDPStatusGetter.dorecv`` does; verified messages are returned,
  datagrams that raise ``InvalidHMACException`` are counted.
* ``wrong_key``: the last verified datagram unwrapped again with another key
  must raise ``InvalidHMACException`` from the same code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import types
import uuid
import warnings

# run as a script: do not let this directory shadow anything octavia imports
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

warnings.filterwarnings("ignore")

# TLS failures that are a verdict, not "the agent is still booting"
TLS_VERDICTS = {
    "Hostname mismatch": "the agent's server certificate is not for this amphora id",
    "CERTIFICATE_VERIFY_FAILED": "the agent's server certificate does not verify against the "
                                 "lab's server CA (issued by another CA)",
    "doesn't match": "the agent's server certificate is not for this amphora id",
    "no appropriate subjectAltName": "the agent's server certificate has no DNS "
                                     "subjectAltName for the amphora id",
    "ALERT_UNKNOWN_CA": "the agent refused the controller's client certificate (unknown CA)",
    "ALERT_BAD_CERTIFICATE": "the agent refused the controller's client certificate",
    "ALERT_CERTIFICATE_REQUIRED": "the agent requires a client certificate",
}


class Driver:
    def __init__(self) -> None:
        self.CONF = None
        self.client = None
        self.amp = None
        self.key = ""
        self.lock = threading.Lock()
        self.beats: list[dict] = []       # verified, not yet handed out
        self.rejected = 0                 # datagrams that failed the HMAC check
        self.rejected_from: set[str] = set()
        self.last_raw: bytes | None = None
        self.sock: socket.socket | None = None
        self.lb = None

    # ------------------------------------------------------------------ ops
    def op_configure(self, req: dict) -> dict:
        from oslo_config import cfg
        from oslo_log import log as oslo_logging
        import octavia.common.config  # noqa: F401  (registers every option group)
        import octavia
        CONF = cfg.CONF
        if "debug" not in CONF:
            oslo_logging.register_options(CONF)
        CONF(args=[], project="octavia", default_config_files=[], default_config_dirs=[])
        o = CONF.set_override
        o("client_cert", req["client_cert"], "haproxy_amphora")
        o("server_ca", req["server_ca"], "haproxy_amphora")
        o("bind_port", int(req["agent_port"]), "haproxy_amphora")
        o("rest_request_conn_timeout", 10, "haproxy_amphora")
        o("rest_request_read_timeout", 120, "haproxy_amphora")
        o("connection_max_retries", int(req.get("retries", 6)), "haproxy_amphora")
        o("connection_retry_interval", int(req.get("retry_interval", 5)), "haproxy_amphora")
        o("agent_tls_protocol", "TLSv1.2", "amphora_agent")
        o("heartbeat_key", req["heartbeat_key"], "health_manager")
        self.CONF = CONF
        self.key = req["heartbeat_key"]
        from octavia.amphorae.drivers.haproxy import rest_api_driver as rad
        self.client = rad.AmphoraAPIClient1_0()       # reads client_cert now
        self.amp = types.SimpleNamespace(id=req["amphora_id"], lb_network_ip=req.get("agent_ip", "127.0.0.1"),
                                         api_version=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((req.get("heartbeat_ip", "127.0.0.1"), int(req.get("heartbeat_port", 0))))
        threading.Thread(target=self._receive, daemon=True).start()
        from importlib.metadata import version
        return {"heartbeat_port": self.sock.getsockname()[1], "octavia": version("octavia"),
                "octavia_path": os.path.dirname(octavia.__file__)}

    def op_version(self, req: dict) -> dict:
        from octavia.amphorae.driver_exceptions import exceptions as dexc
        from octavia.amphorae.drivers.haproxy import exceptions as hexc
        timeout = {"req_conn_timeout": float(req.get("timeout", 10)),
                   "req_read_timeout": float(req.get("timeout", 10)),
                   "conn_max_retries": 1, "conn_retry_interval": 0}
        try:
            got = self.client.get_api_version(self.amp, timeout_dict=timeout,
                                              raise_retry_exception=True)
        except dexc.AmpConnectionRetry as exc:
            reason = str(exc)
            for needle, what in TLS_VERDICTS.items():
                if needle in reason:
                    return {"ok": False, "retry": False, "error": f"{what}: {_short(reason)}"}
            return {"ok": False, "retry": True, "error": _short(reason)}
        except hexc.NotFound:
            return {"ok": False, "retry": True, "error": "GET / answered 404"}
        self.amp.api_version = got["api_version"]
        return {"api_version": got["api_version"]}

    def op_info(self, req: dict) -> dict:
        info = self.client.get_info(self.amp)
        details = self.client.get_details(self.amp)
        return {"info": info, "details": details}

    def op_plug_vip(self, req: dict) -> dict:
        from octavia.amphorae.drivers.haproxy import exceptions as hexc
        from octavia.amphorae.drivers.haproxy import rest_api_driver as rad
        # what Neutron says about the VIP's port and subnet, as the driver gets them
        port = {"id": str(uuid.uuid4()), "mac_address": req["mac_address"].lower(),
                "network": {"mtu": int(req.get("mtu", 1500))}}
        subnet = {"cidr": req["subnet_cidr"], "gateway_ip": req["gateway"], "host_routes": []}
        amphora = {"vrrp_ip": req["vrrp_ip"]}
        net_info = rad.HaproxyAmphoraLoadBalancerDriver._build_net_info(
            None, port, amphora, subnet, port["network"]["mtu"], False)
        try:
            self.client.plug_vip(self.amp, req["vip"], net_info)
            status = "plugged"
        except hexc.Conflict:
            status = "already plugged"
        return {"status": status, "net_info": net_info}

    def op_load_balancer(self, req: dict) -> dict:
        # the driver's update_amphora_listeners, TCP/HTTP branch
        info = self.client.get_info(self.amp)
        details = self.client.get_details(self.amp)
        out = self.op_render(dict(req, haproxy_version=info["haproxy_version"], details=details))
        self.client.upload_config(self.amp, out["load_balancer"], out["haproxy_cfg"])
        self.client.reload_listener(self.amp, out["load_balancer"])
        return out

    def op_render(self, req: dict) -> dict:
        """Data models -> haproxy.cfg with the combined-listeners JinjaTemplater."""
        from octavia.common import constants as c
        from octavia.common import data_models as dm
        from octavia.common.jinja.haproxy.combined_listeners import jinja_cfg
        amp_id = self.amp.id
        lb_id, lst_id, pool_id, hm_id = (str(uuid.uuid4()) for _ in range(4))
        vip_ip = req["vip"]
        hm_req = req["health_monitor"]
        amp = dm.Amphora(id=amp_id, status=c.AMPHORA_ALLOCATED, lb_network_ip=self.amp.lb_network_ip,
                         vrrp_ip=req.get("vrrp_ip"), ha_ip=vip_ip, role=c.ROLE_STANDALONE,
                         load_balancer_id=lb_id)
        lb = dm.LoadBalancer(id=lb_id, project_id="labforge", name="amphora-check", enabled=True,
                             topology=c.TOPOLOGY_SINGLE, provisioning_status=c.ACTIVE,
                             vip=dm.Vip(load_balancer_id=lb_id, ip_address=vip_ip),
                             amphorae=[amp], additional_vips=[])
        hm = dm.HealthMonitor(id=hm_id, pool_id=pool_id, type=c.HEALTH_MONITOR_HTTP,
                              delay=int(hm_req["delay"]), timeout=int(hm_req["timeout"]),
                              rise_threshold=int(hm_req["rise"]), fall_threshold=int(hm_req["fall"]),
                              http_method="GET", url_path=hm_req.get("url_path", "/"),
                              expected_codes="200", enabled=True, provisioning_status=c.ACTIVE)
        pool = dm.Pool(id=pool_id, project_id="labforge", protocol=c.PROTOCOL_HTTP,
                       lb_algorithm=c.LB_ALGORITHM_ROUND_ROBIN, enabled=True,
                       operating_status=c.ONLINE, provisioning_status=c.ACTIVE,
                       health_monitor=hm, load_balancer=lb, load_balancer_id=lb_id,
                       members=[], tls_enabled=False)
        members = []
        for m in req["members"]:
            member = dm.Member(id=str(uuid.uuid4()), pool_id=pool_id, ip_address=m["address"],
                               protocol_port=int(m["port"]), weight=1, enabled=True, backup=False,
                               operating_status=c.NO_MONITOR, provisioning_status=c.ACTIVE)
            pool.members.append(member)
            members.append({"id": member.id, "name": m["name"], "address": m["address"],
                            "port": int(m["port"])})
        listener = dm.Listener(id=lst_id, project_id="labforge", load_balancer=lb,
                               load_balancer_id=lb_id, protocol=c.PROTOCOL_HTTP,
                               protocol_port=int(req["port"]), connection_limit=-1, enabled=True,
                               default_pool=pool, default_pool_id=pool_id, pools=[pool],
                               l7policies=[], insert_headers={}, peer_port=1025,
                               provisioning_status=c.ACTIVE)
        pool.listeners = [listener]
        lb.listeners = [listener]
        lb.pools = [pool]
        versions = req["haproxy_version"].split(".")[:2]
        details = req.get("details") or {}
        ha = self.CONF.haproxy_amphora
        templater = jinja_cfg.JinjaTemplater(
            base_amp_path=ha.base_path, base_crt_dir=ha.base_cert_dir,
            haproxy_template=ha.haproxy_template, connection_logging=ha.connection_logging)
        config = templater.build_config(host_amphora=amp, listeners=lb.listeners, tls_certs={},
                                        haproxy_versions=versions, amp_details=details)
        self.lb = lb
        return {"load_balancer": lb_id, "listener": lst_id, "pool": pool_id,
                "health_monitor": hm_id, "members": members, "haproxy_cfg": config,
                "haproxy_versions": versions}

    def op_listeners(self, req: dict) -> dict:
        return {"listeners": self.client.get_all_listeners(self.amp)}

    def op_heartbeats(self, req: dict) -> dict:
        """Verified heartbeats since the last call; waits up to ``wait`` s for one."""
        deadline = time.monotonic() + float(req.get("wait", 0))
        while True:
            with self.lock:
                if self.beats or time.monotonic() >= deadline:
                    out, self.beats = self.beats, []
                    return {"beats": out, "rejected": self.rejected,
                            "rejected_from": sorted(self.rejected_from)}
            time.sleep(0.2)

    def op_wrong_key(self, req: dict) -> dict:
        from octavia.amphorae.backends.health_daemon import status_message
        from octavia.common import exceptions as oexc
        if self.last_raw is None:
            return {"ok": False, "retry": False, "error": "no verified heartbeat to test with"}
        try:
            status_message.unwrap_envelope(self.last_raw, req["key"])
        except oexc.InvalidHMACException as exc:
            return {"rejected": True, "exception": type(exc).__name__}
        return {"rejected": False}

    # ------------------------------------------------------------- receiver
    def _receive(self) -> None:
        """The health manager's UDPStatusGetter.dorecv, minus the database."""
        from octavia.amphorae.backends.health_daemon import status_message
        from octavia.common import exceptions as oexc
        while True:
            try:
                data, src = self.sock.recvfrom(65535)     # UDP_MAX_SIZE
            except OSError:
                return
            try:
                obj = status_message.unwrap_envelope(data, self.key)
            except oexc.InvalidHMACException:
                with self.lock:
                    self.rejected += 1
                    self.rejected_from.add(f"{src[0]}:{src[1]}")
                continue
            except Exception:                           # not a heartbeat at all
                with self.lock:
                    self.rejected += 1
                continue
            obj["recv_time"] = time.time()
            with self.lock:
                self.beats.append(obj)
                self.last_raw = data


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    for marker in ("SSLError(", "SSLCertVerificationError(", "NewConnectionError(", "ProtocolError("):
        if marker in text:
            text = text[text.index(marker):]
            break
    while text.endswith(")") and text.count(")") > text.count("("):
        text = text[:-1]                 # the closing parens of the wrappers cut off above
    return text[:300]


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    drv = Driver()
    out = sys.stdout
    sys.stdout = sys.stderr          # nothing but answers on the protocol channel
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        fn = getattr(drv, f"op_{op}", None)
        try:
            if fn is None:
                raise ValueError(f"unknown op {op!r}")
            ans = fn(req)
            ans.setdefault("ok", True)
        except Exception as exc:         # noqa: BLE001  every failure is an answer
            logging.getLogger("octavia_driver").warning("op %s failed", op, exc_info=True)
            ans = {"ok": False, "retry": False,
                   "error": f"{type(exc).__module__}.{type(exc).__name__}: {_short(exc) or '(no text)'}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
