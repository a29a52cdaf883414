"""``invoke lab-check``: from the host, what a user checks after ``vagrant up``.

Run against a lab that is up, it checks:

- **names**: on every node (over SSH with the lab key), ``getent hosts``
  gives every other lab host, by name and FQDN, its address on Kafka's
  internal network;
- **ensemble** (``kafka.mode: zookeeper``): every ZooKeeper answers ``srvr``
  on its TLS client port, and there is exactly one leader, the others
  followers;
- **zookeeper-tls**: a TLS client with the lab's client certificate
  (certs/kafka/<kafka.client>) reaches every node's secure ZooKeeper port on
  its public address (kafka.tls_network) and verifies the server
  certificate against the lab CA, once for the node's name and once for
  that address;
- **foreign-ca**: a client certificate from another CA (made here, in
  memory and a temporary directory) is refused.

Each check is one row (an Outcome, "passed" or "failed"); ``--wait`` retries
the failing ones until they pass or the time is up (a lab just booted may
still be electing its leader).  SSH reaches a node at its first NIC's
address (Vagrant's management network) as lab.yaml's user, or as
``--ssh-config FILE`` (``vagrant ssh-config > FILE``) says.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builders.artifacts import kafka_node
from builders.core import extcmd
from builders.core.contract import Check
from builders.core.errors import LabError
from builders.core.lab import Host, Lab
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools import pki

SSH_KEY = ("ssh", "lab_ed25519")
TIMEOUT = 10.0            # seconds per connection


@dataclass
class Row:
    """One check: its name, and how to run it (returns the detail or raises)."""
    step: str
    run: Callable[[], str]


class CheckFailed(Exception):
    """A check's own verdict (the message is the table's detail)."""


# --------------------------------------------------------------------------
# TLS to ZooKeeper
# --------------------------------------------------------------------------
def _context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def four_letter_word(ctx: ssl.SSLContext, address: str, port: int, server_name: str,
                     word: str = "srvr", timeout: float = TIMEOUT) -> str:
    """Send a ZooKeeper four-letter word over TLS, verifying the server
    certificate for ``server_name``; the whole reply (ZooKeeper closes after it)."""
    with socket.create_connection((address, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(word.encode("ascii"))
            chunks = []
            while True:
                try:
                    data = tls.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not data:
                    break
                chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def mode_of(reply: str) -> str | None:
    for line in reply.splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"server certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.timeout):
        return "no answer (timed out)"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# --------------------------------------------------------------------------
# SSH
# --------------------------------------------------------------------------
class Ssh:
    """``ssh`` to a node: through an ssh_config (``vagrant ssh-config``), or at
    its first NIC's address with the lab key."""

    def __init__(self, lab: Lab, ws: Workspace, ssh_config: str | None):
        self.lab, self.config = lab, Path(ssh_config) if ssh_config else None
        if self.config is not None and not self.config.is_file():
            raise LabError(f"--ssh-config: {self.config} is not a file; write it with "
                           "`vagrant ssh-config > FILE` in the Vagrantfile's directory")
        self.key = ws.certs.joinpath(*SSH_KEY)
        if self.config is None and not self.key.is_file():
            raise LabError(f"{self.key}: the lab SSH key is missing; run `invoke certs`, or "
                           "pass --ssh-config (`vagrant ssh-config > FILE`)")

    def argv(self, h: Host, command: str) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={int(TIMEOUT)}"]
        if self.config is not None:
            return ["ssh", "-F", str(self.config), *opts, h.name, command]
        return ["ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes", *opts,
                f"{self.lab.user.name}@{h.ip}", command]

    def run(self, h: Host, command: str) -> str:
        proc = extcmd.run(self.argv(h, command), check=False, timeout=60,
                          what=f"ssh {h.name}")
        if proc.returncode == 255:
            tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
            raise CheckFailed(f"ssh to {h.name} failed: {tail[0] if tail else 'exit 255'}")
        return (proc.stdout or b"").decode(errors="replace")


# --------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------
def _names_row(lab: Lab, ssh: Ssh, h: Host) -> Row:
    others = [o for o in lab.hosts if o.name != h.name]
    want = {}
    for o in others:
        want[o.name] = kafka_node.internal_address(lab, o)
        want[lab.fqdn(o)] = kafka_node.internal_address(lab, o)

    def run() -> str:
        if not want:
            return "no other hosts"
        script = ("for n in " + " ".join(sorted(want)) + "; do "
                  "echo \"$n $(getent hosts $n | awk '{print $1; exit}')\"; done")
        out = ssh.run(h, script)
        got = {}
        for line in out.splitlines():
            parts = line.split()
            if parts:
                got[parts[0]] = parts[1] if len(parts) > 1 else ""
        wrong = [f"{n} -> {got.get(n) or 'nothing'} (want {a})"
                 for n, a in sorted(want.items()) if got.get(n) != a]
        if wrong:
            raise CheckFailed("; ".join(wrong))
        return ", ".join(f"{o.name}={kafka_node.internal_address(lab, o)}" for o in others)
    return Row(f"names {h.name}", run)


def _client_files(lab: Lab, ws: Workspace) -> tuple[Path, Path, Path]:
    d = ws.certs / "kafka"
    files = (d / "ca.crt", d / f"{lab.kafka.client}.crt", d / f"{lab.kafka.client}.key")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise LabError(f"{missing[0]}: missing; run `invoke certs` (lab-check uses the lab's "
                       "CA and client certificate)")
    return files


def rows(lab: Lab, ws: Workspace, *, ssh_config: str | None = None,
         foreign_dir: Path | None = None) -> list[Row]:
    """Every check of the lab, in table order."""
    ssh = Ssh(lab, ws, ssh_config)
    out = [_names_row(lab, ssh, h) for h in lab.hosts]
    brokers = lab.brokers()
    if lab.kafka.mode != "zookeeper" or not brokers:
        return out
    ca, cert, key = _client_files(lab, ws)
    ctx = _context(ca, cert, key)
    port = lab.kafka.zookeeper_port

    def tls_row(h: Host, name: str, how: str) -> Row:
        addr = str(lab.kafka_address(h, "tls"))

        def run() -> str:
            try:
                reply = four_letter_word(ctx, addr, port, name)
            except OSError as exc:
                raise CheckFailed(f"{addr}:{port} as {name}: {_describe(exc)}") from None
            mode = mode_of(reply)
            if mode is None:
                first = (reply.strip().splitlines() or ["(empty reply)"])[0]
                raise CheckFailed(f"{addr}:{port}: no Mode in the reply: {first}")
            return f"{addr}:{port}, certificate verified for {name}, {mode}"
        return Row(f"zookeeper-tls {h.name} by {how}", run)

    for h in brokers:
        out.append(tls_row(h, lab.fqdn(h), "name"))
        out.append(tls_row(h, str(lab.kafka_address(h, "tls")), "address"))

    def ensemble() -> str:
        modes: dict[str, str] = {}
        for h in brokers:
            addr = str(lab.kafka_address(h, "tls"))
            try:
                modes[h.name] = mode_of(four_letter_word(ctx, addr, port, lab.fqdn(h))) \
                    or "not serving"
            except OSError as exc:
                modes[h.name] = f"no answer ({_describe(exc)})"
        leaders = [n for n, m in modes.items() if m == "leader"]
        followers = [n for n, m in modes.items() if m == "follower"]
        if len(leaders) != 1 or len(followers) != len(brokers) - 1:
            raise CheckFailed("; ".join(f"{n}: {m}" for n, m in modes.items()))
        return f"leader {leaders[0]}, followers {', '.join(followers)}"
    out.append(Row("ensemble", ensemble))

    def foreign() -> str:
        h = brokers[0]
        addr = str(lab.kafka_address(h, "tls"))
        with tempfile.TemporaryDirectory(prefix="labforge-foreign-", dir=foreign_dir) as tmp:
            fca_key = pki.new_key()
            fca = pki.new_ca(fca_key, pki.name("labforge foreign CA"), 1)
            fkey = pki.new_key()
            fcert = pki.issue(fca, fca_key, fkey, pki.name(lab.kafka.client), 1,
                              sans=[lab.kafka.client], eku=(pki.CLIENT_AUTH,))
            cp, kp = Path(tmp) / "client.crt", Path(tmp) / "client.key"
            cp.write_bytes(pki.cert_pem(fcert))
            kp.touch(mode=0o600)
            kp.write_bytes(pki.key_pem(fkey))
            fctx = _context(ca, cp, kp)
            try:
                reply = four_letter_word(fctx, addr, port, lab.fqdn(h))
            except ssl.SSLCertVerificationError as exc:
                raise CheckFailed(f"the server's certificate failed: {exc.verify_message}") \
                    from None
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
                return f"{h.name} refused it ({_describe(exc)})"
            except OSError as exc:
                raise CheckFailed(f"{addr}:{port}: {_describe(exc)}") from None
        if mode_of(reply) is None and not reply:
            return f"{h.name} closed the connection without an answer"
        raise CheckFailed(f"{h.name} answered a client of another CA: "
                          f"{(reply.splitlines() or [''])[0]}")
    out.append(Row("foreign-ca refused", foreign))
    return out


def _run_row(row: Row) -> Outcome:
    t0 = time.monotonic()
    try:
        detail, status = row.run(), "passed"
    except CheckFailed as exc:
        detail, status = str(exc), "failed"
    return Outcome(step=row.step, status=status, detail=detail, seconds=time.monotonic() - t0)


class LabCheck(Check):
    name = "lab-check"
    help = "checks a lab that is up: names, the ZooKeeper ensemble over TLS, client auth"

    def check(self, lab: Lab, ws: Workspace, *, ssh_config: str | None = None,
              wait: float = 0, interval: float = 10) -> list[Outcome]:
        table = rows(lab, ws, ssh_config=ssh_config)
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            results = [_run_row(r) for r in table]
            if all(o.status == "passed" for o in results) or time.monotonic() >= deadline:
                return results
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


LAB_CHECK = LabCheck()


def lab_check(lab: Lab, ws: Workspace, **options) -> list[Outcome]:
    return LAB_CHECK.check(lab.require_hosts("lab-check") if hasattr(lab, "require_hosts")
                           else lab, ws, **options)


def table(outcomes: list[Outcome]) -> str:
    width = max([len(o.step) for o in outcomes] + [5])
    lines = [f"{'check':<{width}}  {'status':<7}  detail"]
    lines += [f"{o.step:<{width}}  {o.status:<7}  {o.detail}" for o in outcomes]
    return "\n".join(lines)


def to_json(lab: Lab, ws: Workspace, outcomes: list[Outcome]) -> dict:
    return {
        "lab": lab.name,
        "lab_file": str(lab.source),
        "workdir": str(ws.root),
        "ok": all(o.status == "passed" for o in outcomes),
        "seconds": round(sum(o.seconds for o in outcomes), 3),
        "checks": [{"name": o.step, "status": o.status, "seconds": round(o.seconds, 3),
                    "detail": o.detail} for o in outcomes],
    }
