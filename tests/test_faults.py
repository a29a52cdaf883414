"""The bad-input and fault suite: every bad input across the pipeline gives
one clear line, exit status 1, nothing half-written and an unchanged
manifest; a run killed with SIGKILL at any point is completed by a rerun.
"""

from __future__ import annotations


import pytest
import yaml

from helpers import (ROOT, assert_one_line_error, lab_file, lab_text, make_qcow2, tree_snapshot,
                     write_lab)
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


PIPELINE_CASES = [
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
