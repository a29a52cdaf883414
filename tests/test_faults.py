"""The bad-input and fault suite: every bad input across the pipeline gives
one clear line, exit status 1, nothing half-written and an unchanged
manifest; a run killed with SIGKILL at any point is completed by a rerun.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import (ROOT, assert_one_line_error, broker_nics, lab_file, lab_text, make_qcow2,
                     plain_host, tree_snapshot, write_lab)
from imagetools import publish_debian

DEFAULT = (ROOT / "lab.yaml").read_text()


# (id, lab.yaml text, needle in the error line)
LAB_CASES = [
    ("ip-outside-network", lab_text(**{"hosts.broker2.ip": "10.200.0.12"}),
     "hosts.broker2.ip: 10.200.0.12 is not in network private (10.100.0.0/24)"),
    ("ip-not-an-address", lab_text(**{"hosts.broker1.ip": "10.100.0.999"}), "hosts.broker1.ip:"),
    ("ip-duplicate", lab_text(**{"hosts.broker3.ip": "10.100.0.11"}), "already used by host broker1"),
    ("ip-is-gateway", lab_text(**{"hosts.broker1.ip": "10.100.0.1"}), "is the gateway"),
    ("ip-is-broadcast", lab_text(**{"hosts.broker1.ip": "10.100.0.255"}), "broadcast"),
    ("cidr-host-bits", lab_text(**{"networks.private.cidr": "10.100.0.5/24"}), "networks.private.cidr"),
    ("cidr-garbage", lab_text(**{"networks.private.cidr": "ten-net"}), "networks.private.cidr"),
    ("gateway-outside", lab_text(**{"networks.private.gateway": "192.168.1.1"}), "networks.private.gateway"),
    ("hostname-underscore", lab_text(**{"hosts.bro_ker": {"ip": "10.100.0.20"}}), "not a valid hostname"),
    ("hostname-too-long", lab_text(**{"hosts." + "b" * 64: {"ip": "10.100.0.20"}}), "not a valid hostname"),
    ("unknown-top-key", lab_text(**{"hostz": {}}), "hostz: unknown key"),
    ("unknown-host-key", lab_text(**{"hosts.broker1.ram": 4096}), "hosts.broker1.ram: unknown key"),
    ("wrong-type-cpus", lab_text(**{"hosts.broker1.cpus": "two"}), "hosts.broker1.cpus: expected a whole number"),
    ("wrong-type-bool", lab_text(**{"octavia.enabled": "maybe"}), "octavia.enabled: expected true or false"),
    ("memory-too-small", lab_text(**{"hosts.broker1.memory": 64}), "hosts.broker1.memory"),
    ("bad-mac", lab_text(**{"hosts.broker1.mac": "zz:54:00:00:00:01"}), "hosts.broker1.mac"),
    ("duplicate-mac", lab_text(**{"hosts.broker2.mac": "52:54:00:64:00:0b"}), "already used by host broker1"),
    ("unknown-network-ref", lab_text(**{"hosts.broker1.network": "dmz"}), "no network named 'dmz'"),
    ("unknown-broker-ref", lab_text(**{"kafka.brokers": ["broker1", "kafka9"]}), "kafka.brokers[1]"),
    ("weak-rsa", lab_text(**{"pki.rsa_bits": 1024}), "pki.rsa_bits: 1024"),
    ("leaf-longer-than-ca", lab_text(**{"pki.leaf_days": 5000}), "pki.leaf_days"),
    ("bad-key-type", lab_text(**{"pki.key_type": "dsa"}), "pki.key_type"),
    ("bad-health-manager", lab_text(**{"octavia.health_managers": ["10.100.0.5"]}), "octavia.health_managers[0]"),
    ("bad-amphora-os", lab_text(**{"octavia.amphora.base_os": "centos"}), "octavia.amphora.base_os"),
    ("bad-image-type", lab_text(**{"octavia.amphora.image_type": "vmdk"}), "octavia.amphora.image_type"),
    ("bad-box-name", lab_text(**{"vagrant.box": "no-slash"}), "vagrant.box"),
    ("bad-domain", lab_text(**{"domain": "-bad-.example"}), "domain:"),
    ("hosts-not-mapping", lab_text(**{"hosts": ["broker1"]}), "hosts: expected a mapping"),
    ("top-level-list", "- just\n- a list\n", "the top level must be a mapping"),
    ("yaml-syntax", DEFAULT.replace("cidr: 10.100.0.0/24", "cidr: [10.100.0.0/24"), "invalid YAML"),
    ("duplicate-host-key", DEFAULT.replace("  broker3:\n", "  broker2:\n    ip: 10.100.0.14\n  broker3:\n", 1),
     "'broker2' is given twice"),
    ("write-file-relative", lab_text(**{"hosts.broker1.write_files": [{"path": "etc/x", "content": "x"}]}),
     "write_files[0].path"),
    ("write-file-both", lab_text(**{"hosts.broker1.write_files": [{"path": "/etc/x", "content": "x", "source": "f"}]}),
     "give exactly one of source or content"),
    # output names that would land on another output's file
    ("name-broker-ca", lab_text(**{"hosts.ca": broker_nics(20)}),
     "hosts.ca: the name would make broker ca write certs/kafka/ca.crt, the file of the Kafka CA"),
    ("name-host-net-xml", lab_text(**{"hosts.net-private": broker_nics(20)}),
     "artifacts/libvirt/net-private.xml, the file of network private"),
    ("name-host-volume-xml", lab_text(**{"hosts.broker1-volume": broker_nics(20)}),
     "artifacts/libvirt/broker1-volume.xml, the file of host broker1"),
    ("name-amp-key-octavia-file", lab_text(**{"octavia.amp_ssh_key_name": "server_ca.key.pem"}),
     "is the name of another file in certs/octavia/"),
    ("name-client-reserved", lab_text(**{"kafka.client": "ca"}), "kafka.client: 'ca' is reserved"),
    ("name-client-is-host", lab_text(**{"kafka.client": "broker1"}), "also a host name"),
    ("name-image-traversal", lab_text(**{"hosts.broker1.image": "../../certs/kafka/ca"}),
     "hosts.broker1.image: '../../certs/kafka/ca' is not an image name"),
    # values YAML converts silently
    ("yaml-mode-unquoted", lab_text(**{"hosts.broker1.write_files": [
        {"path": "/etc/x", "content": "x", "permissions": "PERM"}]}).replace("permissions: PERM",
                                                                            "permissions: 0644"),
     'hosts.broker1.write_files[0].permissions: YAML reads the unquoted 0644 as the number 420; '
     'write "0644" in quotes'),
    ("yaml-mac-unquoted", DEFAULT.replace('mac: "52:54:00:64:00:0b"', "mac: 52:54:00:12:34:56"),
     'write "52:54:00:12:34:56" in quotes'),
    ("yaml-release-float", DEFAULT.replace('release: "12"', "release: 24.10").replace(
        "distro: debian", "distro: ubuntu"), 'base_image.release: YAML reads the unquoted 24.10 '
     'as the number 24.1; write "24.10" in quotes'),
    ("yaml-no-as-string", lab_text(**{"hosts.broker1.dhcp_interface": "NO"}).replace(
        "dhcp_interface: 'NO'", "dhcp_interface: no"), 'write "no" in quotes'),
    ("yaml-on-as-choice", lab_text(**{"glance.visibility": "ON"}).replace(
        "visibility: 'ON'", "visibility: on"), "glance.visibility: 'on' is not one of"),
    ("yaml-yes-as-package", lab_text(**{"hosts.broker1.packages": ["YES"]}).replace(
        "- 'YES'", "- yes"), 'hosts.broker1.packages[0]: YAML reads the unquoted yes as true'),
    # values that can never work
    ("mac-multicast", lab_text(**{"hosts.broker1.mac": "01:00:5e:00:00:01"}), "is a multicast address"),
    ("mac-broadcast", lab_text(**{"hosts.broker1.mac": "ff:ff:ff:ff:ff:ff"}), "is a multicast address"),
    ("mac-all-zero", lab_text(**{"hosts.broker1.mac": "00:00:00:00:00:00"}), "is all zeros"),
    ("role-misspelled", lab_text(**{"hosts.broker1.roles": ["kafka-brokr"]}),
     "hosts.broker1.roles[0]: 'kafka-brokr' is not a role labforge knows (did you mean 'kafka-broker'?)"),
    ("role-unknown", lab_text(**{"hosts.broker1.roles": ["zookeeper"]}), "known: kafka-broker"),
    ("user-name-shell", lab_text(**{"user.name": "root; rm -rf /"}), "user.name: 'root; rm -rf /' is not a Linux user name"),
    ("vagrant-network-quote", lab_text(**{"vagrant.management_network": 'lab"net'}),
     "vagrant.management_network:"),
    ("glance-timeout-zero", lab_text(**{"glance.timeout": 0}), "glance.timeout: 0 is out of range"),
    ("empty-lab-file", "", "the lab file is empty"),
    ("comments-only-lab-file", "# nothing here yet\n", "the lab file is empty"),
]


@pytest.mark.parametrize("case_id,text,needle", LAB_CASES, ids=[c[0] for c in LAB_CASES])
@pytest.mark.parametrize("task", ["check-lab", "all"])
def test_bad_lab_yaml(tmp_path, ws, cli, case_id, text, needle, task):
    lab = write_lab(tmp_path, text)
    before = tree_snapshot(ws.root)
    proc = cli(task, "--lab", str(lab))
    assert_one_line_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert tree_snapshot(ws.root) == before


def test_missing_lab_file(tmp_path, cli):
    assert_one_line_error(cli("all", "--lab", str(tmp_path / "nope.yaml")),
                          "lab file not found; pass --lab FILE")


def test_unknown_step_name(cli):
    assert_one_line_error(cli("all", "--only", "kernel"), "--only kernel: unknown step")


# ---------------------------------------------------------------------------
# bad inputs across the pipeline: user files, keys, images, checksums, services
# ---------------------------------------------------------------------------


def _host(**fields):
    """lab_file changes that set ``fields`` on host broker1."""
    return {"hosts.broker1": fields}


def _bad_yaml_user_data(tmp_path, ws, cli):
    f = tmp_path / "user-data"
    f.write_text("#cloud-config\npackages: [a, b\nruncmd: []\n")
    return ["seed-iso", "--lab", lab_file(tmp_path, **_host(user_data=str(f)))]


def _missing_ssh_key(tmp_path, ws, cli):
    return ["seed-iso", "--lab", lab_file(tmp_path, **_host(ssh_authorized_keys=[str(tmp_path / "nope.pub")]))]


def _missing_write_source(tmp_path, ws, cli):
    assert cli("certs").returncode == 0
    return ["seed-iso", "--lab", lab_file(tmp_path, **_host(write_files=[
        {"path": "/etc/x", "source": str(tmp_path / "absent.txt")}]))]


def _seed_without_certs(tmp_path, ws, cli):
    return ["seed-iso"]


def _missing_password_file(tmp_path, ws, cli):
    return ["certs", "--lab", lab_file(tmp_path, kafka={"password_file": str(tmp_path / "nope.pw")})]


def _wrong_store_password(tmp_path, ws, cli):
    assert cli("certs").returncode == 0
    pw = tmp_path / "store.pw"
    pw.write_text("not-the-password-of-the-stores\n")
    return ["certs", "--lab", lab_file(tmp_path, kafka={"password_file": str(pw)})]


def _garbage_ca_key(tmp_path, ws, cli):
    assert cli("certs").returncode == 0
    (ws.certs / "kafka" / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    return ["certs"]


def _certs_check_without_certs(tmp_path, ws, cli):
    return ["certs-check"]


def _box_of_raw_image(tmp_path, ws, cli):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    return ["vagrant-box", "--image", str(raw)]


def _box_of_missing_image(tmp_path, ws, cli):
    return ["vagrant-box", "--image", "debian-13"]


def _box_bad_version(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    return ["vagrant-box", "--image", str(img), "--version", "1.x"]


def _box_bad_name(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    return ["vagrant-box", "--image", str(img), "--name", "no slash"]


def _wrong_checksum(tmp_path, ws, cli, mirror):
    publish_debian(mirror.root, wrong_sum=True)
    return ["base-image", "--lab", lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})]


def _unreachable_mirror(tmp_path, ws, cli):
    return ["base-image", "--lab", lab_file(tmp_path, base_image={"source": "download",
                                                              "url": "http://127.0.0.1:9/debian/"})]


def _unknown_release(tmp_path, ws, cli):
    return ["base-image", "--lab", lab_file(tmp_path, base_image={"source": "download", "release": "99"})]


def _overlays_without_base(tmp_path, ws, cli):
    return ["overlays"]


def _base_not_qcow2(tmp_path, ws, cli):
    img = ws.artifacts / "images" / "debian-12.qcow2"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"\0" * (1 << 20))
    return ["overlays"]


def _disk_smaller_than_base(tmp_path, ws, cli, mirror):
    # a valid lab (disk: 1 GiB passes lab validation) whose base image is
    # 2 GiB virtual: only the overlay builder can see that the disk is too small
    publish_debian(mirror.root, size="2G")
    lab = lab_file(tmp_path, base_image={"source": "download", "url": mirror.url}, **_host(disk=1))
    assert cli("check-lab", "--lab", lab).returncode == 0
    assert cli("base-image", "--lab", lab).returncode == 0
    return ["overlays", "--lab", lab]


def _boot_unknown_host(tmp_path, ws, cli):
    return ["boot-check", "--host", "zookeeper1"]


def _docker_unreachable(tmp_path, ws, cli):
    return ["build-amphora"], {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _amphora_unknown_os(tmp_path, ws, cli):
    return ["build-amphora", "--base-os", "centos"]


def _amphora_too_small(tmp_path, ws, cli):
    return ["build-amphora", "--size", "1"]


def _amphora_check_without_image(tmp_path, ws, cli):
    return ["amphora-check"]


def _glance_unreachable(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    env = {"OS_AUTH_URL": "http://127.0.0.1:9/v3", "OS_USERNAME": "admin", "OS_PASSWORD": "pw",
           "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default", "OS_CLOUD": ""}
    return ["glance-upload", "--image", str(img)], env


def _glance_missing_image(tmp_path, ws, cli):
    return ["glance-upload", "--image", "no-such-image"]


def _publish_without_amphora(tmp_path, ws, cli):
    env = {"OS_AUTH_URL": "http://127.0.0.1:9/v3", "OS_USERNAME": "admin", "OS_PASSWORD": "pw",
           "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default"}
    return ["publish-amphora"], env


def _download_lab(tmp_path, mirror):
    return ["base-image", "--lab", lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})]


def _sums_without_the_image(tmp_path, ws, cli, mirror):
    publish_debian(mirror.root)
    sums = mirror.root / "SHA512SUMS"
    sums.write_text("".join(ln + "\n" for ln in sums.read_text().splitlines()
                            if "genericcloud" not in ln))
    return _download_lab(tmp_path, mirror)


def _sums_malformed(tmp_path, ws, cli, mirror):
    publish_debian(mirror.root)
    (mirror.root / "SHA512SUMS").write_text("<html><body>mirror maintenance</body></html>\n")
    return _download_lab(tmp_path, mirror)


def _sums_not_found(tmp_path, ws, cli, mirror):
    publish_debian(mirror.root)
    (mirror.root / "SHA512SUMS").unlink()
    return _download_lab(tmp_path, mirror)


def _sums_short_digest(tmp_path, ws, cli, mirror):
    img, digest = publish_debian(mirror.root)
    (mirror.root / "SHA512SUMS").write_text(f"{digest[:64]}  {img.name}\n")  # a sha256-long value
    return _download_lab(tmp_path, mirror)


def _ssh_key_is_private(tmp_path, ws, cli):
    key = tmp_path / "id_ed25519"
    import subprocess
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return ["seed-iso", "--lab", lab_file(tmp_path, **_host(ssh_authorized_keys=[str(key)]))]


def _ssh_key_garbage(tmp_path, ws, cli):
    assert cli("certs").returncode == 0
    key = tmp_path / "lab.pub"
    key.write_text("this is not a key\n")
    return ["seed-iso", "--lab", lab_file(tmp_path, **_host(ssh_authorized_keys=[str(key)]))]


def _empty_password_file(tmp_path, ws, cli):
    pw = tmp_path / "store.pw"
    pw.write_text("")
    return ["certs", "--lab", lab_file(tmp_path, kafka={"password_file": str(pw)})]


def _truncated_qcow2(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "trunc.qcow2", "64M", data_mib=4)
    with open(img, "r+b") as fh:
        fh.truncate(img.stat().st_size // 3)
    return ["vagrant-box", "--image", str(img)]


def _truncated_base_image(tmp_path, ws, cli, mirror):
    publish_debian(mirror.root, data_mib=4)
    lab = lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})
    assert cli("base-image", "--lab", lab).returncode == 0
    base = ws.artifacts / "images" / "debian-12.qcow2"
    with open(base, "r+b") as fh:
        fh.truncate(base.stat().st_size // 3)
    return ["overlays", "--lab", lab]


def _truncated_glance_image(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "trunc.qcow2", "64M", data_mib=4)
    with open(img, "r+b") as fh:
        fh.truncate(img.stat().st_size // 3)
    env = {"OS_AUTH_URL": "http://127.0.0.1:9/v3", "OS_USERNAME": "admin", "OS_PASSWORD": "pw",
           "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default", "OS_CLOUD": ""}
    return ["glance-upload", "--image", str(img)], env


def _clouds_yaml(tmp_path, auth_url="http://127.0.0.1:9/v3", password="pw", name="lab"):
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump({"clouds": {name: {
        "auth": {"auth_url": auth_url, "username": "admin", "password": password,
                 "project_name": "admin", "user_domain_name": "Default",
                 "project_domain_name": "Default"},
        "region_name": "RegionOne", "identity_api_version": 3}}}))
    return path


def _glance_unknown_cloud(tmp_path, ws, cli):
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    env = {"OS_CLIENT_CONFIG_FILE": str(_clouds_yaml(tmp_path)), "OS_CLOUD": "",
           "OS_AUTH_URL": ""}
    return ["glance-upload", "--image", str(img), "--cloud", "no-such-cloud"], env


def _keystone_not_keystone(tmp_path, ws, cli, mirror):
    # a web server that answers 200 with a page, at the auth_url
    (mirror.root / "v3").write_text("<html><body>Welcome to nginx!</body></html>\n")
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    env = {"OS_AUTH_URL": mirror.url + "v3", "OS_USERNAME": "admin", "OS_PASSWORD": "pw",
           "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default", "OS_CLOUD": ""}
    return ["glance-upload", "--image", str(img)], env


def _special_lab(kind):
    def prepare(tmp_path, ws, cli):
        import os
        if kind == "dev-zero":
            return ["check-lab", "--lab", "/dev/zero"]
        if kind == "directory":
            return ["all", "--lab", str(tmp_path)]
        if kind == "fifo":
            os.mkfifo(tmp_path / "lab.fifo")
            return ["check-lab", "--lab", str(tmp_path / "lab.fifo")]
        big = tmp_path / "big.yaml"
        big.write_text("# padding\n" * 300_000)
        return ["check-lab", "--lab", str(big)]
    return prepare


def _no_hosts(task):
    def prepare(tmp_path, ws, cli):
        lab = tmp_path / "nohosts.yaml"
        lab.write_text("name: empty-lab\nnetworks: {private: {cidr: 10.100.0.0/24}}\n")
        return [task, "--lab", str(lab)]
    return prepare


def _empty_lab_over_existing_certs(tmp_path, ws, cli):
    """The issue's worst case: an empty lab file must not delete every broker's keys."""
    assert cli("certs").returncode == 0
    (tmp_path / "empty.yaml").write_text("")
    return ["certs", "--lab", str(tmp_path / "empty.yaml")]


def _broker_ca_over_existing_certs(tmp_path, ws, cli):
    assert cli("certs").returncode == 0
    return ["certs", "--lab", str(lab_file(tmp_path, **{"hosts.ca": broker_nics(20)}))]


def _option(*args):
    def prepare(tmp_path, ws, cli):
        return list(args)
    return prepare


def _password_file(content: bytes):
    def prepare(tmp_path, ws, cli):
        pw = tmp_path / "store.pw"
        pw.write_bytes(content)
        return ["certs", "--lab", lab_file(tmp_path, kafka={"password_file": str(pw)})]
    return prepare


def _file_key(where: str, kind: str):
    """A lab naming a file of the wrong kind at ``where``."""
    def prepare(tmp_path, ws, cli):
        import os
        import subprocess
        if kind == "dir":
            target = tmp_path / "a-directory"
            target.mkdir()
        elif kind == "fifo":
            target = tmp_path / "a-fifo"
            os.mkfifo(target)
        elif kind == "dev-zero":
            target = Path("/dev/zero")
        elif kind == "big":
            target = tmp_path / "big.bin"
            with open(target, "wb") as fh:
                fh.truncate(17 << 20)
        elif kind == "pub":
            key = tmp_path / "id_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            target = tmp_path / "id_ed25519.pub"
        else:  # text
            target = tmp_path / "notes.txt"
            target.write_text("not a certificate\n")
        section, _, key = where.partition(".")
        if section == "host":
            value = [str(target)] if key == "ssh_authorized_keys" else \
                [{"path": "/etc/x", "source": str(target)}] if key == "write_files" else str(target)
            changes = _host(**{key: value})
        else:
            changes = {section: {key: str(target)}}
        return ["seed-iso" if section == "host" else "certs", "--lab", lab_file(tmp_path, **changes)]
    return prepare


def _verify_manifest(state: str):
    def prepare(tmp_path, ws, cli):
        lab = str(lab_file(tmp_path, **{"hosts.web": plain_host(30)}))
        assert cli("certs", "--lab", lab).returncode == 0
        assert cli("seed-iso", "--lab", lab).returncode == 0     # web's seed is public
        m = ws.artifacts / "manifest.json"
        if state == "missing":
            m.unlink()
        elif state == "garbage":
            m.write_text('{"version": 1, "artifacts": ')
        else:
            m.unlink()
            m.mkdir()
        return ["verify", "--lab", lab]
    return prepare


def _seed_dir_dangling_symlink(tmp_path, ws, cli):
    import shutil
    lab = str(lab_file(tmp_path, **{"hosts.web": plain_host(30)}))
    assert cli("certs", "--lab", lab).returncode == 0
    assert cli("seed-iso", "--lab", lab).returncode == 0    # fills cache/ (cloud-init's schema)
    shutil.rmtree(ws.artifacts / "seed")
    (ws.artifacts / "seed").symlink_to(tmp_path / "gone")
    return ["seed-iso", "--lab", lab]


_NO_OS_ENV = {"OS_CLOUD": "", "OS_AUTH_URL": "", "OS_USERNAME": "", "OS_PASSWORD": "",
              "OS_PROJECT_NAME": "", "OS_CLIENT_CONFIG_FILE": "/nonexistent/clouds.yaml"}


def _glance_config(kind: str):
    """glance-upload with a configuration mistake: never 'internal error'."""
    def prepare(tmp_path, ws, cli):
        img = make_qcow2(tmp_path / "x.qcow2", "64M")
        args = ["glance-upload", "--image", str(img)]
        env = dict(_NO_OS_ENV)
        clouds = tmp_path / "clouds.yaml"
        if kind == "none":
            return args, env
        if kind == "only-auth-url":
            return args, {**env, "OS_AUTH_URL": "http://127.0.0.1:9/v3"}
        clouds.write_text({
            "malformed": "clouds:\n  lab: [\n",
            "not-mapping": "clouds:\n  - lab\n",
            "no-auth-url": "clouds:\n  lab:\n    auth: {username: admin, password: pw-123456}\n",
            "no-password": "clouds:\n  lab:\n    auth: {auth_url: 'http://127.0.0.1:9/v3', "
                           "username: admin, project_name: admin}\n",
        }[kind])
        return [*args, "--cloud", "lab"], {**env, "OS_CLIENT_CONFIG_FILE": str(clouds)}
    return prepare


def _source_outside(how: str):
    """A write_files source that leaves the lab's directory."""
    def prepare(tmp_path, ws, cli):
        assert cli("certs").returncode == 0
        labdir = tmp_path / "labdir"
        labdir.mkdir()
        if how == "climbs":
            source = "../" * 12 + "etc/hostname"
        elif how == "absolute":
            source = "/etc/hostname"
        else:
            (labdir / "notes.txt").symlink_to("/etc/hostname")
            source = "notes.txt"
        lab = lab_file(labdir, **_host(write_files=[{"path": "/etc/x", "source": source}]))
        return ["seed-iso", "--lab", str(lab)]
    return prepare


def _schema_rejects(attr: str, text: str):
    """user-data / vendor-data that parses but cloud-init's own schema rejects."""
    def prepare(tmp_path, ws, cli):
        assert cli("certs").returncode == 0
        assert cli("seed-iso").returncode == 0      # seeds that must stay as they are
        f = tmp_path / attr
        f.write_text(text)
        return ["seed-iso", "--lab", lab_file(tmp_path, **_host(**{attr: str(f)}))]
    return prepare


def _certs_check_after(how: str):
    """certs-check on material that looks fine by name but does not work."""
    def prepare(tmp_path, ws, cli):
        import shutil
        assert cli("certs").returncode == 0
        k, o = ws.certs / "kafka", ws.certs / "octavia"
        if how == "swapped-key":
            shutil.copy(k / "broker2.key", k / "broker1.key")
        elif how == "garbage-key":
            (k / "broker1.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        elif how == "store-other-password":
            from builders.tools import pki
            cert = pki.load_certs((k / "broker1.crt").read_bytes())[0]
            ca = pki.load_certs((k / "ca.crt").read_bytes())[0]
            key = pki.load_key((k / "broker1.key").read_bytes())
            (k / "broker1.keystore.jks").write_bytes(
                pki.jks_keystore("broker1", key, cert, [ca], "another-password-1"))
        elif how == "store-of-other-key":
            shutil.copy(k / "broker2.keystore.p12", k / "broker1.keystore.p12")
        elif how == "truststore-damaged":
            data = (k / "truststore.p12").read_bytes()
            (k / "truststore.p12").write_bytes(data[: len(data) // 2])
        else:  # octavia CA keys swapped
            a, b = (o / "server_ca.key.pem").read_bytes(), (o / "client_ca.key.pem").read_bytes()
            (o / "server_ca.key.pem").write_bytes(b)
            (o / "client_ca.key.pem").write_bytes(a)
        return ["certs-check"]
    return prepare


PIPELINE_CASES = [
    ("certs-check-swapped-key", _certs_check_after("swapped-key"),
     "broker1.crt: its key does not belong to it (broker1.key)"),
    ("certs-check-garbage-key", _certs_check_after("garbage-key"),
     "broker1.crt: its key does not load"),
    ("certs-check-store-password", _certs_check_after("store-other-password"),
     "broker1.keystore.jks does not open with the stored password"),
    ("certs-check-store-other-key", _certs_check_after("store-of-other-key"),
     "broker1.keystore.p12 does not hold the key of its certificate"),
    ("certs-check-truststore-damaged", _certs_check_after("truststore-damaged"),
     "ca.crt: truststore.p12 does not open with the stored password"),
    ("certs-check-octavia-keys-swapped", _certs_check_after("octavia-swapped"),
     "server_ca.cert.pem: its key does not belong to it (server_ca.key.pem)"),
    ("schema-user-data-packages-not-list", _schema_rejects("user_data", "#cloud-config\npackages: curl\n"),
     "packages: 'curl' is not of type 'array' (cloud-init"),
    ("schema-user-data-power-state", _schema_rejects(
        "user_data", "#cloud-config\npower_state: {mode: off}\n"), "power_state.mode"),
    ("schema-vendor-data-runcmd", _schema_rejects("vendor_data", "#cloud-config\nruncmd: reboot\n"),
     "hosts.broker1.vendor_data"),
    ("source-climbs-out-of-lab-dir", _source_outside("climbs"),
     "is outside the lab file's directory"),
    ("source-absolute-elsewhere", _source_outside("absolute"),
     "/etc/hostname is outside the lab file's directory"),
    ("source-symlink-out-of-lab-dir", _source_outside("symlink"),
     "notes.txt (that is /etc/hostname) is outside the lab file's directory"),
    ("glance-no-cloud", _glance_config("none"), "glance: no cloud configured; pass --cloud NAME"),
    ("glance-only-os-auth-url", _glance_config("only-auth-url"),
     "the OS_* environment variables: no username and no password; set OS_USERNAME and OS_PASSWORD"),
    ("glance-clouds-yaml-malformed", _glance_config("malformed"), "clouds.yaml:3: invalid YAML"),
    ("glance-clouds-yaml-not-mapping", _glance_config("not-mapping"),
     "expected 'clouds:' with a mapping of cloud names"),
    ("glance-cloud-without-auth-url", _glance_config("no-auth-url"),
     "clouds.yaml cloud 'lab': incomplete credentials (no auth_url)"),
    ("glance-cloud-without-password", _glance_config("no-password"),
     "clouds.yaml cloud 'lab': no password; add password under its auth"),
    ("seed-dir-dangling-symlink", _seed_dir_dangling_symlink,
     "artifacts/seed: cannot write the seeds: it is a dangling symlink"),
    ("lab-dev-zero", _special_lab("dev-zero"), "/dev/zero: the lab file must be a regular file, not a character device"),
    ("lab-directory", _special_lab("directory"), "the lab file must be a regular file, not a directory"),
    ("lab-fifo", _special_lab("fifo"), "the lab file must be a regular file, not a named pipe"),
    ("lab-oversized", _special_lab("big"), "more than the 1 MiB labforge reads"),
    ("no-hosts-certs", _no_hosts("certs"), "the lab has no hosts; certs needs at least one"),
    ("no-hosts-seed-iso", _no_hosts("seed-iso"), "the lab has no hosts; seed-iso needs"),
    ("no-hosts-overlays", _no_hosts("overlays"), "the lab has no hosts; overlays needs"),
    ("no-hosts-libvirt-xml", _no_hosts("libvirt-xml"), "the lab has no hosts; libvirt-xml needs"),
    ("no-hosts-vagrantfile", _no_hosts("vagrantfile"), "the lab has no hosts; vagrantfile needs"),
    ("no-hosts-all", _no_hosts("all"), "the lab has no hosts; invoke all"),
    ("empty-lab-keeps-certs", _empty_lab_over_existing_certs, "the lab file is empty"),
    ("broker-ca-keeps-ca-key", _broker_ca_over_existing_certs, "certs/kafka/ca.crt, the file of the Kafka CA"),
    ("opt-boot-timeout", _option("boot-check", "--host", "broker1", "--timeout", "abc"),
     "--timeout abc: expected a number of seconds"),
    ("opt-boot-timeout-negative", _option("boot-check", "--host", "broker1", "--timeout", "-5"),
     "--timeout -5: expected a positive number of seconds"),
    ("opt-boot-memory", _option("boot-check", "--host", "broker1", "--memory", "x"),
     "--memory x: expected a whole number"),
    ("opt-warn-days", _option("certs-check", "--warn-days", "z"), "--warn-days z: expected a whole number"),
    ("opt-amphora-check-timeout", _option("amphora-check", "--timeout", "soon"),
     "--timeout soon: expected a number of seconds"),
    ("opt-glance-min-ram", _option("glance-upload", "--image", "x", "--min-ram", "lots"),
     "--min-ram lots: expected a whole number"),
    ("password-bom", _password_file("\ufeffsecret-store-pw\n".encode()), "byte-order mark"),
    ("password-non-ascii", _password_file("pässwört-store\n".encode()), "use printable ASCII only"),
    ("password-latin1", _password_file(b"p\xe4sswort-store\n"), "not UTF-8 text"),
    ("password-control-char", _password_file(b"secret\x07store\n"), "use printable ASCII only"),
    ("file-password-dir", _file_key("kafka.password_file", "dir"), "kafka.password_file:"),
    ("file-password-dev-zero", _file_key("kafka.password_file", "dev-zero"), "is a character device"),
    ("file-ssh-key-dir", _file_key("host.ssh_authorized_keys", "dir"), "is a directory; name a regular file"),
    ("file-user-data-dir", _file_key("host.user_data", "dir"), "hosts.broker1.user_data:"),
    ("file-user-data-fifo", _file_key("host.user_data", "fifo"), "is a named pipe"),
    ("file-vendor-data-dev-zero", _file_key("host.vendor_data", "dev-zero"), "is a character device"),
    ("file-network-config-big", _file_key("host.network_config", "big"), "more than the"),
    ("file-write-source-big", _file_key("host.write_files", "big"), "hosts.broker1.write_files[0].source"),
    ("file-write-source-fifo", _file_key("host.write_files", "fifo"), "is a named pipe"),
    ("file-vagrant-key-is-pub", _file_key("vagrant.ssh_private_key", "pub"),
     "vagrant.ssh_private_key: "),
    ("file-vagrant-key-not-a-key", _file_key("vagrant.ssh_private_key", "text"), "is not a private key"),
    ("file-ca-bundle-not-pem", _file_key("build.ca_bundle", "text"), "holds no PEM certificate"),
    ("file-ca-bundle-dir", _file_key("build.ca_bundle", "dir"), "build.ca_bundle:"),
    ("verify-manifest-missing", _verify_manifest("missing"), "manifest.json: missing, but"),
    ("verify-manifest-garbage", _verify_manifest("garbage"), "unreadable manifest"),
    ("verify-manifest-directory", _verify_manifest("directory"), "manifest must be a regular file"),

    ("seed-user-data-yaml", _bad_yaml_user_data, "user-data:3: invalid YAML"),
    ("seed-missing-ssh-key", _missing_ssh_key, "nope.pub"),
    ("seed-missing-write-source", _missing_write_source, "absent.txt"),
    ("seed-without-lab-key", _seed_without_certs, "invoke certs"),
    ("certs-missing-password-file", _missing_password_file, "nope.pw"),
    ("certs-wrong-store-password", _wrong_store_password, "password"),
    ("certs-garbage-ca-key", _garbage_ca_key, "ca.key"),
    ("certs-check-without-certs", _certs_check_without_certs, "invoke certs"),
    ("box-raw-image", _box_of_raw_image, "qcow2"),
    ("box-missing-image", _box_of_missing_image, "debian-13"),
    ("box-bad-version", _box_bad_version, "1.x"),
    ("box-bad-name", _box_bad_name, "no slash"),
    ("base-wrong-checksum", _wrong_checksum, "checksum mismatch"),
    ("base-unreachable-mirror", _unreachable_mirror, "127.0.0.1:9"),
    ("base-unknown-release", _unknown_release, "99"),
    ("overlays-without-base", _overlays_without_base, "base-image"),
    ("overlays-base-not-qcow2", _base_not_qcow2, "qcow2"),
    ("overlays-disk-too-small", _disk_smaller_than_base, "hosts.broker1.disk: 1 GiB is smaller than the base image"),
    ("boot-unknown-host", _boot_unknown_host, "zookeeper1"),
    ("amphora-docker-unreachable", _docker_unreachable, "DOCKER_HOST"),
    ("amphora-unknown-os", _amphora_unknown_os, "centos"),
    ("amphora-too-small", _amphora_too_small, "size"),
    ("amphora-check-without-image", _amphora_check_without_image, "build-amphora"),
    ("glance-unreachable-keystone", _glance_unreachable, "127.0.0.1:9"),
    ("glance-missing-image", _glance_missing_image, "no-such-image"),
    ("publish-without-amphora", _publish_without_amphora, "amphora"),
    ("sums-without-the-image", _sums_without_the_image, "lists no debian-12-genericcloud-amd64.qcow2"),
    ("sums-malformed", _sums_malformed, "SHA512SUMS"),
    ("sums-not-found", _sums_not_found, "SHA512SUMS: HTTP 404"),
    ("sums-short-digest", _sums_short_digest, "is not a sha512 digest (64 characters)"),
    ("key-ssh-is-private", _ssh_key_is_private, "id_ed25519 is a private key; name the .pub file"),
    ("key-ssh-garbage", _ssh_key_garbage, "lab.pub is not an OpenSSH public key"),
    ("key-empty-password-file", _empty_password_file, "store.pw is empty"),
    ("image-truncated-qcow2-box", _truncated_qcow2, "trunc.qcow2: `qemu-img check` finds the image damaged"),
    ("image-truncated-base", _truncated_base_image, "debian-12.qcow2: `qemu-img check` finds the image damaged"),
    ("image-truncated-qcow2-glance", _truncated_glance_image, "trunc.qcow2: `qemu-img check` finds the image damaged"),
    ("service-unknown-cloud", _glance_unknown_cloud, "no-such-cloud"),
    ("service-keystone-not-keystone", _keystone_not_keystone, "is Keystone's identity URL"),
]


@pytest.mark.integration
@pytest.mark.parametrize("case_id,prepare,needle", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_bad_input_across_the_pipeline(tmp_path, ws, cli, request, case_id, prepare, needle):
    import inspect
    kwargs = {"mirror": request.getfixturevalue("mirror")} if "mirror" in inspect.signature(prepare).parameters else {}
    prepared = prepare(tmp_path, ws, cli, **kwargs)
    args, env = prepared if isinstance(prepared, tuple) else (prepared, {})
    before = tree_snapshot(ws.root)
    proc = cli(*args, env=env, timeout=300)
    assert_bad_input_outcome(proc, needle, before, ws)


def assert_bad_input_outcome(proc, needle: str, before: dict, ws) -> None:
    """Exit 1, one `error:` line holding ``needle``, no traceback, and the
    workspace as it was (nothing half-written, manifest unchanged)."""
    assert_one_line_error(proc, needle, where="any")
    after = tree_snapshot(ws.root)
    # nothing half-written: no file appeared or changed, except logs of the failed run
    assert {k: v for k, v in after.items() if not k.startswith("artifacts/logs/")} == \
        {k: v for k, v in before.items() if not k.startswith("artifacts/logs/")}
    assert not [p for p in ws.root.rglob("*.part") if p.is_file()]


# ---------------------------------------------------------------------------
# faults of real services: a real Keystone and Glance (slow: they start once)
# ---------------------------------------------------------------------------
from tests.openstack_services import openstack_services, services  # noqa: E402,F401


def _wrong_password_in_env(tmp_path, ws, cli, services):
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    return ["glance-upload", "--image", str(img), "--name", "lf-fault-badpw"], \
        {**services.os_env(password="not-the-password-q7"), "OS_CLOUD": ""}


def _glance_answers_5xx(tmp_path, ws, cli, services, request):
    """Keystone is real and authenticates; the image endpoint answers 503 to
    everything (a Glance behind a failing proxy or out of workers)."""
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            body = b"<html><body>503 Service Unavailable</body></html>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    request.addfinalizer(srv.shutdown)
    cfg = {**services.cloud_config(),
           "image_endpoint_override": f"http://127.0.0.1:{srv.server_address[1]}/"}
    clouds = services.write_clouds_yaml(tmp_path / "clouds.yaml", {"lab-5xx": cfg})
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    return ["glance-upload", "--image", str(img), "--name", "lf-fault-5xx", "--cloud", "lab-5xx"], \
        {"OS_CLIENT_CONFIG_FILE": str(clouds), "OS_CLOUD": "", "OS_AUTH_URL": ""}


SERVICE_CASES = [
    ("service-wrong-password-env", _wrong_password_in_env,
     "refused user admin (HTTP 401): check the password"),
    ("service-glance-5xx", _glance_answers_5xx, "(image_endpoint_override in clouds.yaml cloud 'lab-5xx') does not answer"),
]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("case_id,prepare,needle", SERVICE_CASES, ids=[c[0] for c in SERVICE_CASES])
def test_service_faults(tmp_path, ws, cli, services, request, case_id, prepare, needle):
    import inspect
    extra = {"request": request} if "request" in inspect.signature(prepare).parameters else {}
    args, env = prepare(tmp_path, ws, cli, services, **extra)
    before = tree_snapshot(ws.root)
    proc = cli(*args, env=env, timeout=300)
    assert_bad_input_outcome(proc, needle, before, ws)
    assert services.admin_password not in proc.stderr
    assert "not-the-password-q7" not in proc.stderr


@pytest.mark.integration
def test_keystone_that_never_answers(tmp_path, ws, cli, request):
    """A Keystone that accepts the connection and never answers: one line
    within glance.timeout, not a hang."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])   # keep it open, never answer
            except OSError:
                continue
    threading.Thread(target=accept, daemon=True).start()
    request.addfinalizer(lambda: (stop.set(), [c.close() for c in held], srv.close()))
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/v3"
    img = make_qcow2(tmp_path / "x.qcow2", "64M")
    lab = lab_file(tmp_path, glance={"timeout": 2})
    env = {**_NO_OS_ENV, "OS_AUTH_URL": url, "OS_USERNAME": "admin", "OS_PASSWORD": "pw-7f3k2j",
           "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default"}
    before = tree_snapshot(ws.root)
    proc = cli("glance-upload", "--image", str(img), "--lab", lab, env=env, timeout=120)
    assert_bad_input_outcome(proc, f"Keystone at {url} did not answer within 2s", before, ws)
    assert "pw-7f3k2j" not in proc.stderr
