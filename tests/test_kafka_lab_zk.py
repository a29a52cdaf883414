"""The seeds' ZooKeeper configuration run by ZooKeeper itself, and lab-check's
TLS checks against it, without VMs: three network namespaces stand in for
the brokers (each with its public and private address, /etc/hosts from the
seed's node configuration), joined by a bridge in a fourth namespace where
the checks run.  Debian's ZooKeeper is started with the seed's zoo.cfg and
environment (only guest paths are moved into the test's directory) and the
stores `invoke certs` made: the TLS quorum forms (one leader, two
followers), the lab's client certificate is accepted with hostname
verification by name and by address, and one from another CA is refused.

The bridge lives in a namespace, not in the root one: on hosts where Docker
set FORWARD to DROP with br_netfilter loaded, bridged traffic in the root
namespace is dropped silently.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders.artifacts import kafka_node
from builders.artifacts.certs import build_certs
from builders.core import lab as labmod
from helpers import ROOT

pytestmark = pytest.mark.integration

ZK_JAR = Path("/usr/share/java/zookeeper.jar")


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True, **kw)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    if not ZK_JAR.exists() or shutil.which("java") is None:
        pytest.skip("Debian's zookeeper package is not installed (scripts/packages/kafka.test)")
    tag = secrets.token_hex(3)
    names = {"hub": f"lfhub{tag}", **{f"broker{i}": f"lfzk{i}{tag}" for i in (1, 2, 3)}}
    made: list[str] = []
    had_etc_netns = Path("/etc/netns").exists()
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        if not had_etc_netns:
            try:
                Path("/etc/netns").rmdir()
            except OSError:
                pass


def test_zookeeper_ensemble_from_the_seed_config_passes_lab_check(tmp_path, ws, namespaces):
    lab = labmod.load(ROOT / "lab.yaml")
    build_certs(lab, ws)
    hub = namespaces["hub"]
    private, public = lab.network("private"), lab.network("public")
    bridge = "lfbr0"
    sh("ip", "-n", hub, "link", "add", bridge, "type", "bridge")
    sh("ip", "-n", hub, "addr", "add", f"{private.gateway}/24", "dev", bridge)
    sh("ip", "-n", hub, "addr", "add", f"{public.gateway}/24", "dev", bridge)
    sh("ip", "-n", hub, "link", "set", bridge, "up")
    hosts_text = kafka_node.etc_hosts(lab)
    procs = []
    try:
        for i, h in enumerate(lab.brokers(), start=1):
            ns = namespaces[h.name]
            sh("ip", "-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "-n", hub, "link", "set", f"v{i}", "master", bridge, "up")
            for nic in h.nics:
                sh("ip", "-n", ns, "addr", "add", f"{nic.ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_text)
            # the node's files, with guest paths moved under the test's directory
            node = tmp_path / h.name
            (node / "data").mkdir(parents=True)
            (node / "log").mkdir()
            ssl_dir = node / "ssl"
            ssl_dir.mkdir()
            kafka = ws.certs / "kafka"
            for src, dst in ((f"{h.name}.keystore.p12", f"{h.name}.keystore.p12"),
                             ("truststore.p12", "truststore.p12"),
                             ("store.password", "store.password")):
                shutil.copy(kafka / src, ssl_dir / dst)
            cfg = (kafka_node.zoo_cfg(lab, h)
                   .replace(lab.kafka.ssl_dir, str(ssl_dir))
                   .replace(f"dataDir={kafka_node.ZK_DATA}", f"dataDir={node / 'data'}"))
            (node / "zoo.cfg").write_text(cfg)
            (node / "data" / "myid").write_text(f"{lab.zookeeper_id(h)}\n")
            classpath = kafka_node.ZK_CLASSPATH.replace("/etc/zookeeper/conf",
                                                        "/etc/zookeeper/conf_example")
            log = open(node / "out.log", "wb")
            procs.append((subprocess.Popen(
                ["ip", "netns", "exec", ns, "java", "-cp", classpath, "-Xmx256m",
                 f"-Dzookeeper.log.dir={node / 'log'}", "-Dzookeeper.root.logger=INFO,ROLLINGFILE",
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(node / "zoo.cfg")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        # lab-check's TLS rows (names need SSH into VMs), run inside the hub namespace
        script = (
            "import json, sys\n"
            "from builders.core import lab as labmod\n"
            "from builders.core.workspace import Workspace\n"
            "from builders.checks import labcheck\n"
            f"lab = labmod.load({str(ROOT / 'lab.yaml')!r})\n"
            f"ws = Workspace(__import__('pathlib').Path({str(ws.root)!r}))\n"
            "rows = [r for r in labcheck.rows(lab, ws) if not r.step.startswith('names')]\n"
            "import time\n"
            "deadline = time.monotonic() + 120\n"
            "while True:\n"
            "    out = [labcheck._run_row(r) for r in rows]\n"
            "    if all(o.status == 'passed' for o in out) or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(3)\n"
            "print(json.dumps(labcheck.to_json(lab, ws, out)))\n")
        proc = subprocess.run(["ip", "netns", "exec", hub, sys.executable, "-c", script],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        doc = json.loads(proc.stdout)
        logs = "\n".join((tmp_path / h.name / "out.log").read_text(errors="replace")[-1500:]
                         for h in lab.brokers())
        assert doc["ok"], (json.dumps(doc, indent=1), logs)
        checks = {c["name"]: c for c in doc["checks"]}
        assert set(checks) == {*(f"zookeeper-tls broker{i} by {how}" for i in (1, 2, 3)
                                 for how in ("name", "address")),
                               "ensemble", "foreign-ca refused"}
        assert checks["ensemble"]["detail"].startswith("leader broker")
        assert "followers" in checks["ensemble"]["detail"]
        assert "refused" in checks["foreign-ca refused"]["detail"]
        # the plaintext client port stays closed
        closed = subprocess.run(["ip", "netns", "exec", hub, sys.executable, "-c",
                                 "import socket; socket.create_connection(('192.168.100.11', "
                                 "2181), timeout=3)"], capture_output=True, text=True)
        assert closed.returncode != 0 and "refused" in closed.stderr.lower(), closed.stderr
    finally:
        for p, log in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
            log.close()
