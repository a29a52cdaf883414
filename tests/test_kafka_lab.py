"""The Kafka lab's model and node configuration: NICs on two networks, the
Kafka roles of the networks, ZooKeeper ids, and what the seeds install on a
broker (/etc/hosts, zoo.cfg, myid, server.properties in ZooKeeper and KRaft
mode), checked against the lab."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network

import pytest
import yaml

from builders.artifacts import kafka_node
from builders.artifacts.certs import kafka as certs_kafka
from builders.core import lab as labmod
from helpers import ROOT, assert_one_line_error, problems, write_lab

DEFAULT = yaml.safe_load((ROOT / "lab.yaml").read_text())


def mutate(fn):
    d = copy.deepcopy(DEFAULT)
    fn(d)
    return problems(d)


def props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            assert k not in out, f"{k} given twice"
            out[k] = v
    return out


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------
def test_default_lab_is_three_brokers_on_a_public_and_a_private_network(default_lab):
    lab = default_lab
    pub, priv = lab.network("public"), lab.network("private")
    assert (pub.forward, pub.dhcp, priv.forward, priv.dhcp) == ("nat", True, "none", False)
    assert priv.cidr == IPv4Network("10.100.0.0/24")
    assert lab.kafka_network("tls") == pub and lab.kafka_network("internal") == priv
    assert lab.kafka.mode == "zookeeper"
    assert [(h.name, h.cpus, h.memory) for h in lab.brokers()] == [
        ("broker1", 2, 2048), ("broker2", 2, 2048), ("broker3", 2, 2048)]
    assert [str(lab.kafka_address(h, "internal")) for h in lab.brokers()] == [
        "10.100.0.11", "10.100.0.12", "10.100.0.13"]
    for h in lab.hosts:
        assert [n.network for n in h.nics] == ["public", "private"]
        assert all(n.mac for n in h.nics)
        # ip and mac are the host's lab address: its NIC on the first network
        assert (h.ip, h.network, h.mac) == (h.nics[1].ip, "", h.nics[1].mac)
        assert str(h.ip).startswith("10.100.0.")
    assert [lab.zookeeper_id(h) for h in lab.brokers()] == [1, 2, 3]


def test_a_host_with_one_ip_is_one_nic(tmp_path):
    lab = labmod.load(write_lab(tmp_path, """\
name: one
networks: {net: {cidr: 10.9.0.0/24}}
hosts: {h1: {ip: 10.9.0.5, mac: "52:54:00:00:00:05", interface: lab7}}
"""))
    [h] = lab.hosts
    assert h.nics == (labmod.Nic(network="net", ip=IPv4Address("10.9.0.5"),
                                 mac="52:54:00:00:00:05", name="lab7"),)
    assert h.network == ""          # as given: code that knows one network still defaults


def test_certificate_sans_cover_every_name_and_address(default_lab):
    h = default_lab.host("broker2")
    assert certs_kafka.broker_sans(default_lab, h) == [
        "broker2", "broker2.lab.internal", "192.168.100.12", "10.100.0.12"]


def test_kraft_cluster_id_is_one_per_lab_and_stable(default_lab, tmp_path):
    cid = default_lab.kafka_cluster_id()
    assert len(cid) == 22 and cid == labmod.load(ROOT / "lab.yaml").kafka_cluster_id()
    other = copy.deepcopy(DEFAULT)
    other["name"] = "other-lab"
    assert labmod.from_dict(other).kafka_cluster_id() != cid


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["kafka"].update(tls_network="dmz"),
     "lab.yaml: kafka.tls_network: no network named 'dmz' (networks: private, public); name the "
     "network that carries Kafka's TLS listener"),
    (lambda d: d["kafka"].update(internal_network="backend"),
     "kafka.internal_network: no network named 'backend'"),
    (lambda d: d["hosts"]["broker2"].update(nics=d["hosts"]["broker2"]["nics"][:1]),
     "lab.yaml: hosts.broker2: broker broker2 has no address on network private, which carries "
     "Kafka's inter-broker and ZooKeeper traffic (kafka.internal_network); add a NIC on private"),
    (lambda d: d["hosts"]["broker1"]["nics"][1].update(mac="52:54:00:10:00:0b"),
     "lab.yaml: hosts.broker1.nics[1].mac: 52:54:00:10:00:0b is already used by "
     "host broker1 (nics[0]); every NIC needs its own MAC"),
    (lambda d: d["hosts"]["broker3"]["nics"][0].update(mac="52:54:00:64:00:0b"),
     "hosts.broker3.nics[0].mac: 52:54:00:64:00:0b is already used by host broker1 (nics[1])"),
    (lambda d: d["hosts"]["broker3"].update(zookeeper_id=1),
     "lab.yaml: hosts.broker3.zookeeper_id: 1 is also broker broker1's ZooKeeper id; give each "
     "broker its own"),
    (lambda d: d["hosts"]["broker1"].update(zookeeper_id=256),
     "hosts.broker1.zookeeper_id: 256 is out of range (1-255)"),
    (lambda d: d["hosts"]["broker1"]["nics"][1].pop("mac"),
     "hosts.broker1.nics[1].mac: missing; a host with several NICs needs a MAC on each"),
    (lambda d: d["hosts"]["broker1"]["nics"][1].update(network="public", ip="192.168.100.21"),
     "hosts.broker1.nics[1].network: broker1 already has a NIC on public"),
    (lambda d: d["hosts"]["broker1"]["nics"][1].update(network="lan"),
     "hosts.broker1.nics[1].network: no network named 'lan'"),
    (lambda d: d["hosts"]["broker2"]["nics"][1].update(ip="10.100.0.11"),
     "hosts.broker2.nics[1].ip: 10.100.0.11 is already used by host broker1 (nics[1])"),
    (lambda d: d["hosts"]["broker2"]["nics"][1].update(ip="10.200.0.12"),
     "hosts.broker2.nics[1].ip: 10.200.0.12 is not in network private (10.100.0.0/24)"),
    # with a nics list, ip/mac set the NIC on the host's network (the first)
    (lambda d: d["hosts"]["broker2"].update(ip="10.100.0.11"),
     "hosts.broker2.ip: 10.100.0.11 is already used by host broker1 (nics[1])"),
    (lambda d: d["hosts"]["broker2"].update(network="public", ip="10.100.0.50"),
     "hosts.broker2.ip: 10.100.0.50 is not in network public (192.168.100.0/24)"),
    (lambda d: d["kafka"].update(plaintext_port=9093),
     "kafka.plaintext_port: 9093 is also kafka.port"),
    (lambda d: d["kafka"].update(mode="raft"), "kafka.mode: 'raft' is not one of zookeeper, kraft"),
    (lambda d: d["kafka"].update(cluster_id="abc"), "kafka.cluster_id: 'abc' is not a Kafka cluster id"),
    (lambda d: d["vagrant"].update(driver="xen"), "vagrant.driver: 'xen' is not one of auto, kvm, qemu"),
])
def test_each_bad_kafka_lab_is_one_named_problem(change, needle):
    out = mutate(change)
    assert len(out) == 1, out
    assert needle in out[0], out


@pytest.mark.parametrize("change,needle", [
    ({"kafka": {"tls_network": "dmz"}}, "kafka.tls_network: no network named 'dmz'"),
    ({"hosts": {"broker2": {"nics": [{"network": "public", "ip": "192.168.100.12",
                                      "mac": "52:54:00:10:00:0c"}]}}},
     "hosts.broker2: broker broker2 has no address on network private"),
    ({"hosts": {"broker1": {"nics": [{"network": "public", "ip": "192.168.100.11",
                                      "mac": "52:54:00:10:00:0b"},
                                     {"network": "private", "ip": "10.100.0.11",
                                      "mac": "52:54:00:10:00:0b"}]}}},
     "hosts.broker1.nics[1].mac: 52:54:00:10:00:0b is already used by host broker1 (nics[0])"),
    ({"hosts": {"broker2": {"zookeeper_id": 3}}},
     "hosts.broker3.zookeeper_id: 3 is also broker broker2's ZooKeeper id"),
])
def test_bad_kafka_lab_from_the_cli_is_one_line_and_writes_nothing(tmp_path, cli, ws, change,
                                                                   needle):
    data = copy.deepcopy(DEFAULT)
    for section, body in change.items():
        for key, value in body.items():
            if section == "hosts":
                data["hosts"][key] = {**data["hosts"][key], **value}
            else:
                data[section][key] = value
    lab = write_lab(tmp_path, yaml.safe_dump(data))
    for task in ("check-lab", "certs", "seed-iso", "vagrantfile"):
        proc = cli(task, "--lab", str(lab))
        assert_one_line_error(proc, needle)
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert not ws.root.exists() or not any(p.is_file() for p in ws.root.rglob("*"))


# --------------------------------------------------------------------------
# what a broker gets
# --------------------------------------------------------------------------
def test_etc_hosts_names_every_host_at_its_private_address(default_lab):
    text = kafka_node.etc_hosts(default_lab)
    lines = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert ["10.100.0.11", "broker1.lab.internal", "broker1"] in lines
    assert ["10.100.0.13", "broker3.lab.internal", "broker3"] in lines
    assert ["127.0.0.1", "localhost"] in lines
    assert "127.0.1.1" not in text            # ZooKeeper would bind its quorum port there


def test_zoo_cfg_against_the_lab(default_lab):
    lab = default_lab
    for h in lab.brokers():
        cfg = props(kafka_node.zoo_cfg(lab, h))
        servers = {k: v for k, v in cfg.items() if k.startswith("server.")}
        assert servers == {f"server.{lab.zookeeper_id(b)}": f"{lab.fqdn(b)}:2888:3888"
                           for b in lab.brokers()}
        assert "clientPort" not in cfg and cfg["secureClientPort"] == str(lab.kafka.zookeeper_port)
        assert cfg["sslQuorum"] == "true" and cfg["portUnification"] == "false"
        assert cfg["serverCnxnFactory"].endswith("NettyServerCnxnFactory")
        for p in ("ssl", "ssl.quorum"):
            assert cfg[f"{p}.keyStore.location"] == f"/etc/kafka/ssl/{h.name}.keystore.p12"
            assert cfg[f"{p}.trustStore.location"] == "/etc/kafka/ssl/truststore.p12"
            assert cfg[f"{p}.keyStore.passwordPath"] == "/etc/kafka/ssl/store.password"
            assert cfg[f"{p}.clientAuth"] == "need"
            assert cfg[f"{p}.hostnameVerification"] == "true"
        assert not any(k.startswith("zookeeper.") for k in cfg)   # would become zookeeper.zookeeper.*
    env = kafka_node.zk_environment()
    assert "/usr/share/java/netty-codec.jar" in env and "/usr/share/java/log4j-1.2.jar" in env


def test_server_properties_zookeeper_mode_against_the_lab(default_lab):
    lab = default_lab
    for h in lab.brokers():
        p = props(kafka_node.server_properties(lab, h, "s3cret"))
        n = lab.zookeeper_id(h)
        priv, pub = lab.kafka_address(h, "internal"), lab.kafka_address(h, "tls")
        assert p["broker.id"] == str(n)
        assert p["listeners"] == f"PLAINTEXT://{priv}:9092,SSL://{pub}:9093"
        assert p["advertised.listeners"] == f"PLAINTEXT://{lab.fqdn(h)}:9092,SSL://{pub}:9093"
        assert p["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,SSL:SSL"
        assert p["inter.broker.listener.name"] == "PLAINTEXT"
        assert p["zookeeper.connect"] == ",".join(f"broker{i}.lab.internal:2281" for i in (1, 2, 3))
        assert p["zookeeper.ssl.client.enable"] == "true"
        assert p["zookeeper.ssl.keystore.location"] == f"/etc/kafka/ssl/{h.name}.keystore.p12"
        assert p["ssl.keystore.location"] == f"/etc/kafka/ssl/{h.name}.keystore.p12"
        assert p["ssl.truststore.location"] == "/etc/kafka/ssl/truststore.p12"
        assert p["ssl.keystore.password"] == "s3cret" and p["ssl.client.auth"] == "required"
        assert p["log.dirs"] == "/var/lib/kafka/data"
        assert "process.roles" not in p and "security.inter.broker.protocol" not in p


def test_server_properties_kraft_mode(tmp_path):
    data = copy.deepcopy(DEFAULT)
    data["kafka"]["mode"] = "kraft"
    data["hosts"]["broker1"]["zookeeper_id"] = 7
    lab = labmod.from_dict(data)
    voters = "7@10.100.0.11:9094,2@10.100.0.12:9094,3@10.100.0.13:9094"
    for h in lab.brokers():
        text = kafka_node.server_properties(lab, h, "pw")
        p = props(text)
        priv, pub = lab.kafka_address(h, "internal"), lab.kafka_address(h, "tls")
        assert p["process.roles"] == "broker,controller"
        assert p["node.id"] == str(lab.zookeeper_id(h))
        assert p["controller.quorum.voters"] == voters
        assert p["controller.listener.names"] == "CONTROLLER"
        assert p["listeners"] == f"PLAINTEXT://{priv}:9092,SSL://{pub}:9093,CONTROLLER://{priv}:9094"
        assert "CONTROLLER" not in p["advertised.listeners"]
        assert p["listener.security.protocol.map"] == \
            "PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT"
        assert not any(k.startswith("zookeeper.") or k == "broker.id" for k in p)
        assert f"kafka-storage.sh format -t {lab.kafka_cluster_id()}" in text
    # KRaft: no ZooKeeper on the nodes
    files, runcmd, packages = kafka_node.node_config(lab, lab.host("broker1"))
    assert not any("zookeeper" in f.path for f in files) and runcmd == () and packages == ()


def test_node_config_of_a_broker(default_lab):
    lab = default_lab
    h = lab.host("broker2")
    files, runcmd, packages = kafka_node.node_config(lab, h)
    by_path = {f.path: f for f in files}
    assert by_path["/etc/zookeeper/conf.lab/myid"].content == "2\n"
    assert by_path["/etc/kafka/ssl/broker2.keystore.p12"].source == "certs:kafka/broker2.keystore.p12"
    assert by_path["/etc/kafka/ssl/store.password"].owner == "root:zookeeper"
    assert by_path["/etc/kafka/ssl/store.password"].permissions == "0640"
    assert by_path["/etc/kafka/server.properties"].source == "certs:kafka/server-broker2.properties"
    assert any("update-alternatives --set zookeeper-conf /etc/zookeeper/conf.lab" in c
               for c in runcmd)
    assert runcmd[-1] == "systemctl enable --now zookeeper.service"
    assert packages == ()                   # baked into the base image (base_image.packages)
    data = copy.deepcopy(DEFAULT)
    data["base_image"]["source"] = "download"
    assert kafka_node.node_config(labmod.from_dict(data), h)[2] == ("zookeeper",)


# --------------------------------------------------------------------------
# the seeds, read by cloud-init itself
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_broker_seed_read_and_rendered_by_cloud_init(ws, tmp_path, default_lab):
    """With the certs made, broker1's seed (secret) carries the whole node:
    cloud-init's NoCloud reader takes it, its schema accepts the user-data,
    and its renderers bring up both NICs matched by MAC: DHCP on public
    (the reservation), static on private."""
    import base64
    import subprocess

    from builders.artifacts.certs import build_certs
    from builders.artifacts.seed import build_seed_isos, seed_path
    from test_seediso_cloudinit import _extract, _read_like_nocloud

    build_certs(default_lab, ws)
    outcomes = build_seed_isos(default_lab, ws)
    assert [o.status for o in outcomes] == ["built"] * 3
    iso = seed_path(default_lab, ws, "broker1")
    assert iso == ws.certs / "seed" / "broker1.iso" and iso.stat().st_mode & 0o777 == 0o600
    seed = _extract(iso, tmp_path / "s1")
    schema = subprocess.run(["cloud-init", "schema", "--config-file", str(seed / "user-data")],
                            capture_output=True, text=True)
    assert schema.returncode == 0 and "Valid cloud-config" in schema.stdout, schema.stderr
    got = _read_like_nocloud(seed, tmp_path / "w1")
    (cfg,) = got["cloud_config"]
    assert cfg["manage_etc_hosts"] is False
    files = {w["path"]: base64.b64decode(w["content"]) for w in cfg["write_files"]}
    kafka = ws.certs / "kafka"
    assert files["/etc/kafka/ssl/broker1.keystore.p12"] == \
        (kafka / "broker1.keystore.p12").read_bytes()
    assert files["/etc/kafka/server.properties"] == \
        (kafka / "server-broker1.properties").read_bytes()
    assert files["/etc/zookeeper/conf.lab/zoo.cfg"].decode() == \
        kafka_node.zoo_cfg(default_lab, default_lab.host("broker1"))
    assert files["/etc/zookeeper/conf.lab/myid"] == b"1\n"
    assert files["/etc/hosts"].decode() == kafka_node.etc_hosts(default_lab)
    deferred = {w["path"] for w in cfg["write_files"] if w.get("defer")}
    assert "/etc/kafka/ssl/store.password" in deferred       # root:zookeeper: after packages
    assert "systemctl enable --now zookeeper.service" in cfg["runcmd"]
    assert "packages" not in cfg                              # baked into the base image
    eni = got["render"]["eni:etc/network/interfaces.d/50-cloud-init"]
    assert "iface public inet dhcp" in eni
    assert "iface private inet static\n    address 10.100.0.11/24" in eni
    rules = got["render"]["eni:etc/udev/rules.d/70-persistent-net.rules"]
    assert 'ATTR{address}=="52:54:00:10:00:0b", NAME="public"' in rules
    assert 'ATTR{address}=="52:54:00:64:00:0b", NAME="private"' in rules
    nd = got["render"]["networkd:etc/systemd/network/10-cloud-init-private.network"]
    assert "MACAddress=52:54:00:64:00:0b" in nd and "Address=10.100.0.11/24" in nd
    assert "Gateway" not in nd                                 # the private network is isolated
