"""The amphora proven as a load balancer (the host side of ``amphora-check``).

Octavia's controller code does the talking (``octavia_driver.py``, run by
the ``.venv-octavia`` interpreter; :class:`OctaviaDriver` is its handle);
this module provides what a cloud would around it and judges the result:

* the VIP network: a second QEMU user network (``10.0.3.0/24``) on a NIC
  with a fixed MAC; the VIP ``10.0.3.100:80`` is forwarded to a port on the
  host's 127.0.0.1, and the network's gateway ``10.0.3.2`` is the host's
  127.0.0.1 seen from the amphora, so members served here are
  ``10.0.3.2:<port>`` to the amphora;
* two HTTP backends (:class:`Backend`), each answering with its name;
* the health manager: the driver's UDP socket on 127.0.0.1, which the
  amphora reaches as ``10.0.2.2:<port>`` on its management network;
* :func:`prove` runs the load-balancer sequence on a booted amphora whose
  agent answers and returns a :class:`Report`, or raises one LabError line.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from builders.core.errors import LabError
from builders.core import resources

log = logging.getLogger("labforge")

# the checkout's virtualenv with Octavia (scripts/setup.d/octavia.sh); an
# installed copy names an interpreter with LABFORGE_OCTAVIA_PYTHON
OCTAVIA_VENV = (resources.checkout_dir() or Path("/nonexistent")) / ".venv-octavia"
DRIVER = Path(__file__).resolve().parent / "octavia_driver.py"

# the VIP network (QEMU user networking on the amphora's second NIC)
VIP_NET = "10.0.3.0/24"
VIP_GATEWAY = "10.0.3.2"          # QEMU's host address on that network: the host's 127.0.0.1
VIP_VRRP_IP = "10.0.3.15"         # the amphora's own address on it (Octavia's vrrp_ip)
VIP = "10.0.3.100"
VIP_MAC = "fa:16:3e:4c:00:02"     # Nova's MAC prefix; plug_vip finds the NIC by it
HEALTH_MANAGER_IP = "10.0.2.2"    # QEMU's host address on the management network
HEARTBEAT_INTERVAL = 3            # seconds ([health_manager] heartbeat_interval)
# HTTP health monitor: GET / every DELAY s; DOWN after FALL failures, UP after RISE
HM = {"delay": 2, "timeout": 2, "fall": 2, "rise": 1, "url_path": "/"}
REQUESTS = 12                     # per traffic phase (the issue asks for at least 10)
STEP_TIMEOUT = 90.0               # each wait below (heartbeat, VIP answering, member down)


def vip_nic_options(vip_port: int) -> tuple[str, ...]:
    """QEMU ``-netdev user`` options of the VIP network (host 127.0.0.1:vip_port -> VIP:80)."""
    return (f"net={VIP_NET}", f"hostfwd=tcp:127.0.0.1:{vip_port}-{VIP}:80")


# --------------------------------------------------------------------------
# the driver process
# --------------------------------------------------------------------------
def driver_python() -> Path:
    """The interpreter that has Octavia: LABFORGE_OCTAVIA_PYTHON, else the
    checkout's .venv-octavia."""
    env = os.environ.get("LABFORGE_OCTAVIA_PYTHON", "").strip()
    py = Path(env) if env else OCTAVIA_VENV / "bin" / "python"
    if not py.is_file():
        where = f"LABFORGE_OCTAVIA_PYTHON={env}: no such file" if env else \
            f"{OCTAVIA_VENV.name} (Octavia's controller code) is missing"
        raise LabError(f"amphora-check: {where}; in a checkout run `bash scripts/setup.sh` "
                       "(scripts/setup.d/octavia.sh), else point LABFORGE_OCTAVIA_PYTHON at a "
                       "Python with octavia and pyroute2; or use `invoke amphora-check --quick` "
                       "for the agent check alone")
    return py


class OctaviaDriver:
    """``octavia_driver.py`` under .venv-octavia: one JSON line in, one out.

    Its stderr (Octavia's own log lines) goes to ``log_path``.  Always
    stopped by :meth:`close` (a context manager), on every path.
    """

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.last_err = ""
        self._answers: queue.Queue = queue.Queue()

    def __enter__(self) -> "OctaviaDriver":
        py = driver_python()
        self._err = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(py), "-W", "ignore", str(DRIVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def call(self, op: str, timeout: float = 300.0, **req) -> dict:
        """Send one request; the answer, or LabError for an error that is not ``retry``."""
        ans = self.ask(op, timeout, **req)
        if not ans.get("ok"):
            raise LabError(f"amphora-check: Octavia's {op}: {ans.get('error')}; "
                           f"Octavia's log: {self.log_path}")
        return ans

    def ask(self, op: str, timeout: float = 300.0, **req) -> dict:
        """Send one request; the raw answer (``ok`` false included)."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **req}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise LabError(f"amphora-check: Octavia's driver process ended; its log: "
                           f"{self.log_path}", self.log_tail()) from None
        try:
            line = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise LabError(f"amphora-check: Octavia's {op} did not answer within {timeout:.0f}s; "
                           f"its log: {self.log_path}", self.log_tail()) from None
        if line is None:
            raise LabError(f"amphora-check: Octavia's driver process ended during {op}; its log: "
                           f"{self.log_path}", self.log_tail())
        return json.loads(line)

    def log_tail(self, n: int = 8) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)
            proc.wait()
        self._err.close()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# backends and traffic
# --------------------------------------------------------------------------
class Backend:
    """An HTTP server on 127.0.0.1 answering every GET with its name."""

    def __init__(self, name: str):
        self.name = name
        body = (name + "\n").encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:        # HAProxy's health checks hang up early
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        """Stop answering: the port is closed, connections are refused."""
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()


def get(port: int, timeout: float = 10.0) -> str:
    """One request to the VIP through its host forward; the body, stripped."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode(errors="replace").strip()


def first_answer(port: int, limit: float) -> tuple[str, float]:
    """Retry until the VIP answers (the first SYN may wait for ARP); (body, seconds)."""
    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < limit:
        try:
            return get(port, timeout=5), time.monotonic() - t0
        except (OSError, urllib.error.URLError) as exc:
            last = str(getattr(exc, "reason", exc))
            time.sleep(1)
    raise LabError(f"amphora-check: the VIP {VIP}:80 (127.0.0.1:{port}) did not answer within "
                   f"{limit:.0f}s after the listener started ({last})")


def traffic(port: int, n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            out.append(get(port))
        except (OSError, urllib.error.URLError) as exc:
            out.append(f"<error: {getattr(exc, 'reason', exc)}>")
    return out


# --------------------------------------------------------------------------
# heartbeats
# --------------------------------------------------------------------------
@dataclass
class Beat:
    listener: str | None          # FRONTEND status (OPEN/FULL), None when not reported
    pool: str | None
    members: dict[str, str]       # member id -> status as the amphora reports it
    recv: float                   # time.time() of receipt

    def up(self, member_ids) -> bool:
        return (self.listener == "OPEN" and self.pool == "UP"
                and all(self.members.get(m, "").startswith("UP") for m in member_ids))


def parse_beat(msg: dict, listener_id: str | None, pool_id: str | None) -> Beat:
    lst = (msg.get("listeners") or {}).get(listener_id or "", {})
    pools = msg.get("pools") or {}
    pool = next((v for k, v in pools.items() if pool_id and k.split(":")[0] == pool_id), {})
    return Beat(lst.get("status"), pool.get("status"), dict(pool.get("members") or {}),
                float(msg.get("recv_time", time.time())))


# --------------------------------------------------------------------------
# the sequence
# --------------------------------------------------------------------------
@dataclass
class Report:
    amphora_id: str
    octavia: str = ""
    api_version: str = ""
    haproxy_version: str = ""
    configured: list[str] = field(default_factory=list)
    balanced: list[str] = field(default_factory=list)        # answers with both members
    degraded: list[str] = field(default_factory=list)        # answers after one stopped
    beat_up: str = ""
    beat_down: str = ""
    heartbeats: int = 0
    rejected: int = 0
    wrong_key: str = ""
    first_beat: float = 0.0              # time.time() the first verified heartbeat arrived
    started: float = 0.0                 # time.time() QEMU started
    agent_s: float = 0.0                 # QEMU start -> the agent answered Octavia's client
    accel: str = ""
    foreign_client: str = ""
    balanced_s: float = 0.0
    member_down_s: float = 0.0

    def counts(self, answers: list[str]) -> str:
        names = sorted(set(answers))
        return ", ".join(f"{n} {answers.count(n)}" for n in names)

    def lines(self) -> list[str]:
        return [
            f"amphora {self.amphora_id}: agent API {self.api_version}, HAProxy "
            f"{self.haproxy_version}, driven by Octavia {self.octavia}'s controller code; "
            f"agent answered {self.agent_s:.0f}s after QEMU started ({self.accel.upper() or '?'})",
            *[f"  configured: {c}" for c in self.configured],
            f"  requests balanced: {self.counts(self.balanced)} ({len(self.balanced)} requests, "
            f"alternating); time to balanced {self.balanced_s:.1f}s after the listener started",
            f"  heartbeat (both up): {self.beat_up}",
            f"  member-2 stopped: heartbeat {self.beat_down} after {self.member_down_s:.1f}s; "
            f"then {self.counts(self.degraded)} ({len(self.degraded)} requests)",
            f"  heartbeats: {self.heartbeats} verified with the lab's key (the first "
            f"{self.first_beat - self.started:.0f}s after QEMU started), {self.rejected} rejected; "
            f"checked with another key: {self.wrong_key}",
            f"  a client certificate from another CA: refused ({self.foreign_client})",
        ]


def _status_text(beat: Beat, names: dict[str, str]) -> str:
    members = ", ".join(f"{names.get(m, m[:8])} {s}" for m, s in sorted(
        beat.members.items(), key=lambda kv: names.get(kv[0], kv[0])))
    return f"listener {beat.listener or '-'}, pool {beat.pool or '-'}, {members or 'no members'}"


def _next_beats(drv: OctaviaDriver, amphora_id: str, lb: dict, report: Report) -> Iterator[Beat]:
    """This amphora's heartbeats from the next wait (the others are ignored),
    parsed; counted in ``report`` with the rejected ones."""
    got = drv.call("heartbeats", wait=HEARTBEAT_INTERVAL + 1, timeout=30)
    report.rejected = got["rejected"]
    for msg in got["beats"]:
        if msg.get("id") == amphora_id:
            report.heartbeats += 1
            yield parse_beat(msg, lb["listener"], lb["pool"])


def alternating(answers: list[str]) -> bool:
    return all(a != b for a, b in zip(answers, answers[1:]))


def wait_first_heartbeat(drv: OctaviaDriver, amphora_id: str, hb_port: int, key_file: str,
                         limit: float = STEP_TIMEOUT) -> tuple[list[dict], int]:
    """Verified heartbeats from this amphora, once there is one; (them, rejected so far)."""
    t0 = time.monotonic()
    while True:
        got = drv.call("heartbeats", wait=3, timeout=30)
        mine = [b for b in got["beats"] if b.get("id") == amphora_id]
        if mine:
            return mine, got["rejected"]
        if got["rejected"] >= 2:
            raise LabError(
                f"amphora-check: {got['rejected']} heartbeats arrived at 127.0.0.1:{hb_port} but do "
                f"not verify with the lab's heartbeat key ({key_file}): Octavia's unwrap_envelope "
                f"raised InvalidHMACException; the amphora has another [health_manager] heartbeat_key")
        if time.monotonic() - t0 > limit:
            raise LabError(
                f"amphora-check: no heartbeat from the amphora within {limit:.0f}s at 127.0.0.1:"
                f"{hb_port} ({HEALTH_MANAGER_IP}:{hb_port} from the amphora); is its health daemon "
                f"running? see the console log")


def prove(drv: OctaviaDriver, *, amphora_id: str, vip_port: int, hb_port: int, key_file: str,
          backends: list[Backend], report: Report, limit: float = STEP_TIMEOUT) -> Report:
    """The load-balancer sequence on an amphora whose agent answered (see the module doc)."""
    info = drv.call("info")
    report.haproxy_version = info["info"].get("haproxy_version", "?")
    # heartbeats come before any load balancer: they prove the key and the path to us
    beats, report.rejected = wait_first_heartbeat(drv, amphora_id, hb_port, key_file, limit)
    report.heartbeats = len(beats)
    report.first_beat = min(b.get("recv_time", time.time()) for b in beats)
    plug = drv.call("plug_vip", vip=VIP, subnet_cidr=VIP_NET, gateway=VIP_GATEWAY,
                    mac_address=VIP_MAC, vrrp_ip=VIP_VRRP_IP)
    members = [{"name": b.name, "address": VIP_GATEWAY, "port": b.port} for b in backends]
    lb = drv.call("load_balancer", vip=VIP, vrrp_ip=VIP_VRRP_IP, port=80, members=members,
                  health_monitor=HM)
    t_listener = time.monotonic()
    ids = [m["id"] for m in lb["members"]]
    names = {m["id"]: m["name"] for m in lb["members"]}
    report.configured = [
        f"VIP {VIP} on the NIC with MAC {VIP_MAC} (plug_vip: {plug['status']}; vrrp_ip "
        f"{VIP_VRRP_IP}, gateway {VIP_GATEWAY}), forwarded from 127.0.0.1:{vip_port}",
        "listener HTTP :80 -> pool ROUND_ROBIN, members "
        + ", ".join(f"{m['name']} {m['address']}:{m['port']}" for m in lb["members"]),
        f"health monitor HTTP GET {HM['url_path']} every {HM['delay']}s, timeout {HM['timeout']}s, "
        f"fall {HM['fall']}, rise {HM['rise']}; heartbeats every {HEARTBEAT_INTERVAL}s to "
        f"{HEALTH_MANAGER_IP}:{hb_port}",
    ]
    settle = HM["delay"] * (HM["fall"] + 1) + HM["timeout"]

    # 1. both members UP in a heartbeat sent after the monitor had time to decide
    up_since = time.time() + settle
    deadline = time.monotonic() + limit      # until the pool shows up in a heartbeat
    last: Beat | None = None
    while True:
        for beat in _next_beats(drv, amphora_id, lb, report):
            if beat.members and (last is None or not last.members):
                # HAProxy runs: the monitor has settle s to decide, a member 30 s more to come up
                deadline = min(deadline, time.monotonic() + settle + 30)
            if beat.recv >= up_since or beat.members:
                last = beat
        if last is not None and last.recv >= up_since and last.up(ids):
            break
        if time.monotonic() > deadline:
            if last is None or not last.members:
                raise LabError(f"amphora-check: no heartbeat reported the listener's pool within "
                               f"{limit:.0f}s of starting it (is HAProxy running in the amphora? "
                               f"see the console log)")
            down = [f"{names[m]} ({VIP_GATEWAY}:{b.port}) is {last.members.get(m) or 'missing'}"
                    for m, b in zip(ids, backends) if not last.members.get(m, "").startswith("UP")]
            if down:
                raise LabError(f"amphora-check: {', '.join(down)} in the amphora's heartbeats "
                               f"{time.monotonic() - t_listener:.0f}s after the listener started: "
                               f"it never answered the "
                               f"HTTP health monitor (GET {HM['url_path']})")
            raise LabError(f"amphora-check: the heartbeats do not report the listener up "
                           f"({_status_text(last, names)}) {limit:.0f}s after it started")
    report.beat_up = _status_text(last, names)

    # 2. traffic through the VIP alternates between both members
    first, _ = first_answer(vip_port, limit)
    answers = [first, *traffic(vip_port, REQUESTS - 1)]
    report.balanced_s = time.monotonic() - t_listener
    report.balanced = answers
    want = {b.name for b in backends}
    if set(answers) != want or not alternating(answers):
        raise LabError(f"amphora-check: {REQUESTS} requests to the VIP were answered "
                       f"{' '.join(answers)}; ROUND_ROBIN over {', '.join(sorted(want))} should "
                       "alternate between both")

    # 3. one member stops: a heartbeat says DOWN, the other answers everything
    victim, survivor = backends[1], backends[0]
    victim_id = ids[1]
    victim.stop()
    t_stop = time.time()
    deadline = time.monotonic() + limit
    down: Beat | None = None
    while down is None:
        for beat in _next_beats(drv, amphora_id, lb, report):
            last = beat
            if beat.members.get(victim_id, "").startswith("DOWN"):
                down = beat
                break
        if down is None and time.monotonic() > deadline:
            raise LabError(f"amphora-check: {limit:.0f}s after {victim.name} stopped, no heartbeat "
                           f"reported it DOWN (last: {_status_text(last, names) if last else '-'})")
    report.member_down_s = down.recv - t_stop
    report.beat_down = _status_text(down, names)
    answers = traffic(vip_port, REQUESTS)
    report.degraded = answers
    if set(answers) != {survivor.name}:
        raise LabError(f"amphora-check: with {victim.name} down, {REQUESTS} requests to the VIP "
                       f"were answered {' '.join(answers)}; every one should be {survivor.name}")

    # 4. the same code refuses a heartbeat checked with another key
    wk = drv.call("wrong_key", key="not-the-lab-heartbeat-key")
    if not wk.get("rejected"):
        raise LabError("amphora-check: a heartbeat checked with another key was accepted by "
                       "Octavia's unwrap_envelope")
    report.wrong_key = f"rejected ({wk['exception']})"
    return report
