"""What a Kafka lab node needs besides its certificates, rendered from the lab.

The seed builder puts these on each broker the cloud-init way
(:func:`node_config`: write_files, runcmd, packages), so a node comes up
configured with no step by hand:

- ``/etc/hosts`` naming every lab host at its address on Kafka's internal
  network (every host, brokers or not; see :func:`etc_hosts`);
- ZooKeeper (``kafka.mode: zookeeper``): Debian's ``zookeeper`` package
  configured in ``/etc/zookeeper/conf.lab`` (made the active configuration
  with update-alternatives): ``zoo.cfg`` for a three-node ensemble with a
  TLS quorum and a TLS client port with client authentication, using the
  broker's keystore and the lab truststore that Kafka's SSL listener uses
  (``kafka.ssl_dir``), passwords read from a file; ``myid``; ``environment``
  with the classpath Debian's jar manifest lacks; and a systemd unit (the
  package has none; ``zookeeperd``'s SysV script would start the example
  configuration on install);
- Kafka's ``server.properties``: made by ``invoke certs`` as
  ``certs/kafka/server-<host>.properties`` (it holds the store password) by
  :func:`server_properties`, installed as ``/etc/kafka/server.properties``.

Nothing here writes a file; see docs/kafka-lab.md.
"""

from __future__ import annotations

from builders.core.lab import Host, Lab, WriteFile

ZK_CONF = "/etc/zookeeper/conf.lab"      # the lab's configuration directory (an alternative)
ZK_DATA = "/var/lib/zookeeper"           # Debian's: myid there links to the conf dir's
ZK_QUORUM_PORT = 2888
ZK_ELECTION_PORT = 3888
ZK_UNIT = "/etc/systemd/system/zookeeper.service"
KAFKA_PROPERTIES = "/etc/kafka/server.properties"
ZK_PACKAGE = "zookeeper"
# Debian's zookeeper.jar manifest leaves out netty-codec (and netty-resolver):
# without them the TLS quorum listener dies with NoClassDefFoundError; and it
# has no SLF4J binding, so the server logs nothing without log4j's
ZK_CLASSPATH = ":".join([
    "/etc/zookeeper/conf", "/usr/share/java/zookeeper.jar", "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar", "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar"])


def _ext(lab: Lab) -> str:
    return "p12" if lab.kafka.store_type == "PKCS12" else "jks"


def stores(lab: Lab, h: Host) -> dict[str, str]:
    """Where the node's keystore, truststore and password file are (guest paths)."""
    d = lab.kafka.ssl_dir.rstrip("/")
    return {"keystore": f"{d}/{h.name}.keystore.{_ext(lab)}",
            "truststore": f"{d}/truststore.{_ext(lab)}",
            "password": f"{d}/store.password"}


def internal_address(lab: Lab, h: Host) -> str:
    """The address a host's name resolves to in the lab: on Kafka's internal
    network when the host has a NIC there, else its first NIC's."""
    nic = lab.nic_on(h, lab.kafka_network("internal").name) if lab.networks else None
    return str(nic.ip if nic else h.ip)


def etc_hosts(lab: Lab) -> str:
    """/etc/hosts of every node: localhost, then each lab host, FQDN first
    (ZooKeeper's quorum checks a peer's certificate against the name its
    address maps back to, which must be one the certificate holds).  The
    node's own name is never 127.0.1.1: ZooKeeper would bind its quorum
    port there.  Made once per lab object: every host's seed holds it."""
    hit = _ETC_HOSTS.get(id(lab))
    if hit is not None and hit[0] is lab:
        return hit[1]
    text = _etc_hosts(lab)
    _ETC_HOSTS.clear()                  # one lab at a time is enough
    _ETC_HOSTS[id(lab)] = (lab, text)
    return text


_ETC_HOSTS: dict[int, tuple[Lab, str]] = {}


def _etc_hosts(lab: Lab) -> str:
    lines = ["# /etc/hosts of lab {} (labforge: the lab's names on its internal network)"
             .format(lab.name),
             "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback",
             "ff02::1\tip6-allnodes",
             "ff02::2\tip6-allrouters"]
    for h in lab.hosts:
        names = [lab.fqdn(h), h.name] if lab.fqdn(h) != h.name else [h.name]
        lines.append(f"{internal_address(lab, h)}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# ZooKeeper
# --------------------------------------------------------------------------
def ensemble(lab: Lab) -> list[tuple[int, Host]]:
    """(myid, host) of every ZooKeeper server: the brokers."""
    return [(lab.zookeeper_id(b), b) for b in lab.brokers()]


def zookeeper_connect(lab: Lab) -> str:
    """Kafka's zookeeper.connect: every server's TLS client port, by name."""
    return ",".join(f"{lab.fqdn(b)}:{lab.kafka.zookeeper_port}" for _, b in ensemble(lab))


def zoo_cfg(lab: Lab, h: Host) -> str:
    """zoo.cfg of broker ``h``: the ensemble by name (names resolve to the
    internal network through /etc/hosts), quorum over TLS, a TLS client port
    with client authentication and no plaintext one, hostname verification
    on both.  zoo.cfg keys other than ZooKeeper's own become ``zookeeper.*``
    system properties (ZooKeeper 3.8), so no JVM flag is needed."""
    st = stores(lab, h)
    kind = lab.kafka.store_type
    tls = []
    for prefix in ("ssl", "ssl.quorum"):
        tls += [f"{prefix}.keyStore.location={st['keystore']}",
                f"{prefix}.keyStore.passwordPath={st['password']}",
                f"{prefix}.keyStore.type={kind}",
                f"{prefix}.trustStore.location={st['truststore']}",
                f"{prefix}.trustStore.passwordPath={st['password']}",
                f"{prefix}.trustStore.type={kind}",
                f"{prefix}.clientAuth=need",
                f"{prefix}.hostnameVerification=true"]
    servers = [f"server.{zid}={lab.fqdn(b)}:{ZK_QUORUM_PORT}:{ZK_ELECTION_PORT}"
               for zid, b in ensemble(lab)]
    return "\n".join([
        f"# labforge: ZooKeeper on {h.name}, server {lab.zookeeper_id(h)} of lab {lab.name}'s "
        "ensemble (quorum and clients over TLS)",
        "tickTime=2000",
        "initLimit=10",
        "syncLimit=5",
        f"dataDir={ZK_DATA}",
        "# no clientPort: the plaintext client port stays closed",
        f"secureClientPort={lab.kafka.zookeeper_port}",
        "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
        "authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider",
        "sslQuorum=true",
        "portUnification=false",
        *servers,
        *tls,
        "4lw.commands.whitelist=srvr,mntr,ruok",
        "admin.enableServer=false",
        "",
    ])


def zk_environment() -> str:
    """/etc/zookeeper/conf.lab/environment: Debian's, with the classpath fixed."""
    return "\n".join([
        "# labforge: Debian's conf_example/environment with netty-codec, netty-resolver",
        "# (missing from zookeeper.jar's Class-Path: TLS fails without them) and a log4j",
        "# binding (without one the server logs nothing) on the classpath",
        "ZOOMAIN=org.apache.zookeeper.server.quorum.QuorumPeerMain",
        "ZOOCFGDIR=/etc/zookeeper/conf",
        "ZOOCFG=/etc/zookeeper/conf/zoo.cfg",
        "ZOO_LOG_DIR=/var/log/zookeeper",
        "ZOO_LOG4J_PROP=INFO,ROLLINGFILE",
        "JMXLOCALONLY=true",
        'JAVA_OPTS="-Xms128m -Xmx512m"',
        "JAVA=/usr/bin/java",
        f'CLASSPATH="{ZK_CLASSPATH}"',
        "",
    ])


def zk_unit() -> str:
    """The systemd unit: the java command line of Debian's init script."""
    cmd = ('. /etc/zookeeper/conf/environment && exec "$JAVA" -cp "$CLASSPATH" $JAVA_OPTS '
           '-Dzookeeper.log.dir="$ZOO_LOG_DIR" -Dzookeeper.root.logger="$ZOO_LOG4J_PROP" '
           '$ZOOMAIN "$ZOOCFG"')
    return "\n".join([
        "# labforge: ZooKeeper of the lab ensemble (Debian's zookeeper package has no unit)",
        "[Unit]",
        "Description=ZooKeeper server (lab ensemble, TLS)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "User=zookeeper",
        "Group=zookeeper",
        f"ExecStart=/bin/sh -c '{cmd}'",
        "Restart=on-failure",
        "RestartSec=5",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------
def _store_lines(lab: Lab, h: Host, password: str, prefix: str = "ssl") -> list[str]:
    st = stores(lab, h)
    kind = lab.kafka.store_type
    return [f"{prefix}.keystore.type={kind}",
            f"{prefix}.keystore.location={st['keystore']}",
            f"{prefix}.keystore.password={password}",
            *([f"{prefix}.key.password={password}"] if prefix == "ssl" else []),
            f"{prefix}.truststore.type={kind}",
            f"{prefix}.truststore.location={st['truststore']}",
            f"{prefix}.truststore.password={password}"]


def listeners(lab: Lab, h: Host) -> dict[str, tuple[str, int, str]]:
    """name -> (bind address, port, advertised host) of the broker's listeners:
    PLAINTEXT on the internal network (advertised by name: it resolves to the
    internal address on every node), SSL on the TLS network (advertised by
    address, which the certificate holds, so clients need no lab DNS)."""
    k = lab.kafka
    internal = str(lab.kafka_address(h, "internal"))
    public = str(lab.kafka_address(h, "tls"))
    out = {"PLAINTEXT": (internal, k.plaintext_port, lab.fqdn(h)),
           "SSL": (public, k.port, public)}
    if k.mode == "kraft":
        out["CONTROLLER"] = (internal, k.controller_port, "")
    return out


def server_properties(lab: Lab, h: Host, password: str) -> str:
    """Kafka's server.properties of broker ``h``: everything it needs from
    the lab.  ZooKeeper mode: broker.id, zookeeper.connect over TLS; KRaft:
    process.roles, node.id, controller.quorum.voters, the controller
    listener (format the storage with the cluster id in the header)."""
    k = lab.kafka
    lst = listeners(lab, h)
    n = len(lab.brokers())
    rf = min(3, n)
    head = [f"# labforge: server.properties of Kafka broker {h.name} (lab {lab.name}, "
            f"{k.mode} mode).",
            f"# Install as {KAFKA_PROPERTIES}; the stores go to {k.ssl_dir}. Holds the store "
            "password: keep it private."]
    if k.mode == "kraft":
        voters = ",".join(f"{lab.zookeeper_id(b)}@{lab.kafka_address(b, 'internal')}:"
                          f"{k.controller_port}" for b in lab.brokers())
        head += [f"# cluster id of the lab: {lab.kafka_cluster_id()}; before the first start:",
                 f"#   kafka-storage.sh format -t {lab.kafka_cluster_id()} -c {KAFKA_PROPERTIES}",
                 "process.roles=broker,controller",
                 f"node.id={lab.zookeeper_id(h)}",
                 f"controller.quorum.voters={voters}",
                 "controller.listener.names=CONTROLLER"]
    else:
        head += [f"broker.id={lab.zookeeper_id(h)}"]
    proto = {"PLAINTEXT": "PLAINTEXT", "SSL": "SSL", "CONTROLLER": "PLAINTEXT"}
    lines = head + [
        "listeners=" + ",".join(f"{name}://{addr}:{port}" for name, (addr, port, _) in lst.items()),
        "advertised.listeners=" + ",".join(f"{name}://{adv}:{port}"
                                           for name, (_, port, adv) in lst.items()
                                           if name != "CONTROLLER"),
        "listener.security.protocol.map=" + ",".join(f"{name}:{proto[name]}" for name in lst),
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={k.log_dirs}",
        f"offsets.topic.replication.factor={rf}",
        f"transaction.state.log.replication.factor={rf}",
        f"transaction.state.log.min.isr={max(1, rf - 1)}",
        f"default.replication.factor={rf}",
        f"min.insync.replicas={max(1, rf - 1)}",
        *_store_lines(lab, h, password),
        "ssl.client.auth=required",
        "ssl.endpoint.identification.algorithm=https",
        "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
    ]
    if k.mode == "zookeeper":
        lines += [
            f"zookeeper.connect={zookeeper_connect(lab)}",
            "zookeeper.ssl.client.enable=true",
            "zookeeper.clientCnxnSocket=org.apache.zookeeper.ClientCnxnSocketNetty",
            *_store_lines(lab, h, password, prefix="zookeeper.ssl"),
            "zookeeper.ssl.endpoint.identification.algorithm=HTTPS",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the seed's part
# --------------------------------------------------------------------------
def bakes_zookeeper(lab: Lab) -> bool:
    """True when the lab's base image is built with ZooKeeper in it."""
    return lab.base_image.source == "build" and ZK_PACKAGE in lab.base_image.packages


def certs_files(lab: Lab, h: Host) -> list[str]:
    """The files under certs/kafka/ a broker's node configuration ships."""
    ext = _ext(lab)
    return [f"{h.name}.keystore.{ext}", f"truststore.{ext}", "store.password",
            f"server-{h.name}.properties"]


def missing_certs(lab: Lab, ws, h: Host) -> list[str]:
    """Which of the broker's certs/kafka/ files `invoke certs` has not made (yet)."""
    return [f for f in certs_files(lab, h) if not (ws.certs / "kafka" / f).is_file()]


def node_config(lab: Lab, h: Host, ws=None
                ) -> tuple[tuple[WriteFile, ...], tuple[str, ...], tuple[str, ...]]:
    """(write_files, runcmd, packages) the seed adds for host ``h``: /etc/hosts
    on every host; on a broker its stores, the store password,
    server.properties and (ZooKeeper mode) ZooKeeper, started.  With ``ws``,
    a broker whose certs/kafka/ files are not there (no `invoke certs` yet)
    gets /etc/hosts only (the seed builder says so).  A host with its own
    user-data gets nothing (that file is used as is)."""
    if h.user_data is not None:
        return (), (), ()
    files = [WriteFile(path="/etc/hosts", content=etc_hosts(lab))]
    if h.name not in {b.name for b in lab.brokers()}:
        return tuple(files), (), ()
    if ws is not None and missing_certs(lab, ws, h):
        return tuple(files), (), ()
    st = stores(lab, h)
    zk = lab.kafka.mode == "zookeeper"
    # the stores are the broker's (Kafka's SSL listener) and ZooKeeper's alike;
    # the zookeeper group exists once the package is installed (cloud-init
    # writes files with such an owner in its final stage, after packages)
    group = "root:zookeeper" if zk else "root:root"
    ext = _ext(lab)
    files += [
        WriteFile(path=st["keystore"], source=f"certs:kafka/{h.name}.keystore.{ext}",
                  owner=group, permissions="0640"),
        WriteFile(path=st["truststore"], source=f"certs:kafka/truststore.{ext}",
                  owner=group, permissions="0640"),
        WriteFile(path=st["password"], source="certs:kafka/store.password",
                  owner=group, permissions="0640"),
        WriteFile(path=KAFKA_PROPERTIES, source=f"certs:kafka/server-{h.name}.properties",
                  permissions="0600"),
    ]
    if not zk:
        return tuple(files), (), ()
    files += [
        WriteFile(path=f"{ZK_CONF}/zoo.cfg", content=zoo_cfg(lab, h)),
        WriteFile(path=f"{ZK_CONF}/myid", content=f"{lab.zookeeper_id(h)}\n"),
        WriteFile(path=f"{ZK_CONF}/environment", content=zk_environment()),
        WriteFile(path=ZK_UNIT, content=zk_unit()),
    ]
    runcmd = (
        f"test -e {ZK_CONF}/log4j.properties || "
        f"cp /etc/zookeeper/conf_example/log4j.properties {ZK_CONF}/",
        f"update-alternatives --install /etc/zookeeper/conf zookeeper-conf {ZK_CONF} 50",
        f"update-alternatives --set zookeeper-conf {ZK_CONF}",
        "systemctl daemon-reload",
        "systemctl enable --now zookeeper.service",
    )
    packages = () if bakes_zookeeper(lab) else (ZK_PACKAGE,)
    return tuple(files), runcmd, packages


def with_node_config(lab: Lab, h: Host, ws=None) -> Host:
    """``h`` with the node configuration added to its own write_files (after
    them; the host's own file of a path wins), runcmd (before) and packages
    (what the seed renders)."""
    import dataclasses
    files, runcmd, packages = node_config(lab, h, ws)
    own = {wf.path for wf in h.write_files}
    files = tuple(wf for wf in files if wf.path not in own)
    return dataclasses.replace(
        h, write_files=(*h.write_files, *files), runcmd=(*runcmd, *h.runcmd),
        packages=(*packages, *[p for p in h.packages if p not in packages]))
