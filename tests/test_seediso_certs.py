"""seed-iso with what `invoke certs` really makes: the lab SSH key and a
broker's stores and TLS properties shipped in the seed (a secret seed)."""

from __future__ import annotations

import base64
import os

import yaml

from builders.core import lab as labmod
from builders.artifacts.certs import build_certs
from builders.core.manifest import Manifest
from builders.artifacts.seed import build_seed_isos, read_seed, seed_path

from helpers import write_lab

LAB = """\
name: certlab
domain: lab.internal
networks:
  private: {cidr: 10.100.0.0/24, gateway: 10.100.0.1}
pki: {key_type: ecdsa}
octavia: {enabled: false}
defaults: {roles: [kafka-broker]}
hosts:
  broker1:
    ip: 10.100.0.11
    mac: "52:54:00:64:00:0b"
    write_files:
      - {path: /etc/kafka/ssl/broker1.keystore.p12, source: "certs:kafka/broker1.keystore.p12",
         owner: "root:root", permissions: "0600"}
      - {path: /etc/kafka/ssl/truststore.p12, source: "certs:kafka/truststore.p12"}
      - {path: /etc/kafka/ssl/server.properties, source: "certs:kafka/server-broker1.properties",
         permissions: "0600"}
  broker2:                    # not a broker: no Kafka node configuration
    ip: 10.100.0.12
    roles: []
"""


def test_seeds_carry_the_certs_and_the_lab_key(tmp_path, ws):
    lab = labmod.load(write_lab(tmp_path, LAB))
    build_certs(lab, ws)
    outcomes = build_seed_isos(lab, ws)
    assert [o.status for o in outcomes] == ["built", "built"]

    secret = seed_path(lab, ws, "broker1")
    assert secret == ws.certs / "seed" / "broker1.iso"
    assert secret.stat().st_mode & 0o777 == 0o600
    ud = yaml.safe_load(read_seed(secret)["user-data"])
    shipped = {w["path"]: base64.b64decode(w["content"]) for w in ud["write_files"]}
    kafka = ws.certs / "kafka"
    own = {
        "/etc/kafka/ssl/broker1.keystore.p12": (kafka / "broker1.keystore.p12").read_bytes(),
        "/etc/kafka/ssl/truststore.p12": (kafka / "truststore.p12").read_bytes(),
        "/etc/kafka/ssl/server.properties": (kafka / "server-broker1.properties").read_bytes(),
    }
    # the host's own files (which win over the node configuration's at the
    # same path), then the node configuration: names, password, properties,
    # ZooKeeper
    assert {p: shipped[p] for p in own} == own
    assert list(shipped)[:3] == list(own)
    assert shipped["/etc/kafka/ssl/store.password"] == (kafka / "store.password").read_bytes()
    assert shipped["/etc/kafka/server.properties"] == own["/etc/kafka/ssl/server.properties"]
    assert {"/etc/hosts", "/etc/zookeeper/conf.lab/zoo.cfg"} <= set(shipped)
    lab_key = (ws.certs / "ssh" / "lab_ed25519.pub").read_text().strip()
    assert ud["ssh_authorized_keys"] == [lab_key]

    # broker2 ships nothing from certs/: a public seed with the same lab key
    public = seed_path(lab, ws, "broker2")
    assert public == ws.artifacts / "seed" / "broker2.iso"
    assert yaml.safe_load(read_seed(public)["user-data"])["ssh_authorized_keys"] == [lab_key]

    # nothing secret under artifacts/: not the seed, not the store password
    password = (kafka / "store.password").read_text().strip().encode()
    assert list(Manifest(ws.artifacts).entries()) == ["seed/broker2.iso"]
    for root, _, files in os.walk(ws.artifacts):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            assert password not in data, name
            assert (kafka / "broker1.keystore.p12").read_bytes() not in data, name

    # certs re-issued -> the seed changes; unchanged -> up to date
    assert {o.status for o in build_seed_isos(lab, ws)} == {"up to date"}
    build_certs(lab, ws, force=True)
    by_host = {o.step: o.status for o in build_seed_isos(lab, ws)}
    assert by_host == {"seed-iso broker1": "built", "seed-iso broker2": "up to date"}
