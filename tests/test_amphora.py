"""Amphora: settings, config drive, bad input; the slow end-to-end build + boot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builders.artifacts import amphora
from builders.checks import amphora_check
from builders.tools import dib, docker_engine
from builders.core.errors import LabError
from builders.core.manifest import Manifest
from builders.core.fsutil import sha256_file
from imagetools import assert_compressed_and_clean, installed_packages
from helpers import assert_one_line_error, lab_file


# --------------------------------------------------------------------------
# fast: settings, element list, agent config, config drive
# --------------------------------------------------------------------------
def test_settings_defaults_come_from_lab(default_lab):
    s = amphora.settings(default_lab)
    assert (s["base_os"], s["release"], s["size"], s["image_type"]) == ("debian", "bookworm", 2, "qcow2")
    assert s["octavia_version"] == default_lab.octavia.amphora.octavia_version


def test_ubuntu_defaults_to_noble(default_lab):
    s = amphora.settings(default_lab, base_os="ubuntu")
    assert s["release"] == "noble"
    els = amphora.elements(s)
    assert "ubuntu-minimal" in els and "amphora-apparmor" in els and "labforge-debian" not in els


def test_elements_keep_upstreams_list(default_lab):
    els = amphora.elements(amphora.settings(default_lab))
    for e in ("base", "vm", "debian-minimal", "haproxy-octavia", "rebind-sshd", "no-resolvconf",
              "amphora-agent", "octavia-lib", "sos", "cloud-init-datasources", "remove-default-ints",
              "keepalived-octavia", "ipvsadmin", "pip-cache", "certs-ramfs",
              "labforge-debian", "labforge-build-ca"):
        assert e in els
    assert "remove-sshd" not in els
    assert "remove-sshd" in amphora.elements(amphora.settings(default_lab, ssh=False))


def test_local_elements_exist_and_are_executable():
    root = docker_engine.DOCKERFILE_DIR / "elements"
    for e in amphora.LOCAL_ELEMENTS + amphora.DEBIAN_ELEMENTS:
        assert (root / e / "README.rst").is_file()
        for hook in (root / e).glob("*.d/*"):
            if not hook.name.endswith(".bash"):
                assert os.access(hook, os.X_OK), hook


def test_dib_environment_uses_host_mirrors_and_local_sources(default_lab, ws):
    env = amphora.dib_environment(default_lab, ws, amphora.settings(default_lab))
    assert env["DIB_RELEASE"] == "bookworm"
    assert env["DIB_DEBIAN_SECURITY_MIRROR"].endswith("-security")
    assert "security.debian.org" not in env["DIB_DEBIAN_SECURITY_MIRROR"]
    assert env["DIB_REPOLOCATION_amphora_agent"].startswith("/opt/labforge/src/")
    assert env["DIB_CLOUD_INIT_DATASOURCES"] == "ConfigDrive"
    assert env["LABFORGE_KEEP_CA_BUNDLE"] == "0"
    # the builder image carries the build CA; host paths of it are not for the chroot
    assert "SSL_CERT_FILE" not in env and "PIP_CERT" not in env
    assert env["DIB_IMAGE_CACHE"].startswith(str(ws.cache / "amphora" / "dib"))
    assert "TMP_DIR" not in env and "DIB_NO_TMPFS" not in env      # DIB's tmpfs, as before


def test_the_amphora_runs_dib_like_the_base_image(default_lab, ws):
    """One DIB command line (tools.dib) for the amphora too: its elements,
    size and arch; Octavia's and labforge's elements from the builder image."""
    s = amphora.settings(default_lab)
    cmd = dib.dib_command(default_lab, ws, exe="disk-image-create", elements=amphora.elements(s),
                          workdir=ws.cache / "w", image_size=s["size"], arch=s["arch"],
                          elements_path=docker_engine.BUILDER_ELEMENTS_PATH,
                          env=amphora.dib_settings(default_lab, s, ws.cache), tmpfs=True,
                          host_ca=False)
    assert cmd.argv[:6] == ["disk-image-create", "-t", "qcow2", "-o", str(ws.cache / "w" / "image"),
                            "-a"] and "--no-tmpfs" not in cmd.argv
    assert cmd.argv[-len(amphora.elements(s)):] == amphora.elements(s)
    assert cmd.env["ELEMENTS_PATH"] == "/opt/labforge/src/octavia/elements:/opt/labforge/elements"
    assert cmd.env["DIB_RELEASE"] == "bookworm"


def test_digest_changes_with_inputs(default_lab):
    s = amphora.settings(default_lab)
    d1 = amphora.image_digest(default_lab, s)
    assert d1 == amphora.image_digest(default_lab, amphora.settings(default_lab))
    assert d1 != amphora.image_digest(default_lab, amphora.settings(default_lab, size=3))
    assert d1 != amphora.image_digest(default_lab, amphora.settings(default_lab, ssh=False))


def test_amphora_declares_the_image_it_builds(default_lab, ws):
    """What `invoke all` finds for a left-out amphora step is the builder's
    declared output (not a name rebuilt elsewhere, e.g. octavia.image_name)."""
    [out] = amphora.AMPHORA.outputs(default_lab, ws)
    assert out.path == ws.artifacts / "images" / "amphora-x64-haproxy.qcow2"
    assert out.kind == "amphora" and out.digest() == amphora.image_digest(
        default_lab, amphora.settings(default_lab))
    assert "amphora-x64-haproxy.qcow2" in amphora.AMPHORA.ready(default_lab, ws)
    [raw] = amphora.AMPHORA.outputs(default_lab, ws, image_type="raw")
    assert raw.path.name == "amphora-x64-haproxy.raw"


def test_package_layer_only_where_its_package_list_holds(default_lab):
    s = amphora.settings(default_lab)
    assert amphora.layer_name(default_lab, s).startswith("bookworm-")
    for over in ({"arch": "arm64"}, {"agent": "package"}, {"octavia_version": "18.0.1"},
                 {"base_os": "ubuntu"}):
        assert amphora.layer_name(default_lab, amphora.settings(default_lab, **over)) is None, over


def test_standins_only_on_kernels_without_device_mapper(monkeypatch):
    monkeypatch.setattr(dib, "has_device_mapper", lambda: True)
    assert dib.builder_path("/usr/bin:/bin") == "/usr/bin:/bin"
    monkeypatch.setattr(dib, "has_device_mapper", lambda: False)
    assert dib.builder_path("/usr/bin:/bin") == f"{docker_engine.BUILDER_STANDIN_DIR}:/usr/bin:/bin"


def test_builder_starts_from_the_local_base_unless_told(default_lab):
    import dataclasses
    assert docker_engine.builder_from(default_lab) == docker_engine.BASE_TAG
    lab = dataclasses.replace(default_lab, build=dataclasses.replace(
        default_lab.build, builder_from="debian:bookworm"))
    assert docker_engine.builder_from(lab) == "debian:bookworm"


def test_index_credentials_never_reach_messages_or_the_cache(default_lab, ws):
    import dataclasses
    lab = dataclasses.replace(default_lab, build=dataclasses.replace(
        default_lab.build, pip_index="https://ci:s3cret@127.0.0.1:9/simple"))
    s = amphora.settings(lab)
    with pytest.raises(LabError) as err:
        docker_engine.check_octavia_release(lab, s["octavia_version"])
    assert "s3cret" not in str(err.value) and "https://***@127.0.0.1:9/simple" in str(err.value)
    assert "s3cret" not in docker_engine.release_memo(lab, ws, s)[1]


@pytest.mark.parametrize("over,needle", [
    ({"base_os": "gentoo"}, "unknown base OS"),
    ({"size": 1}, "at least 2 GB"),
    ({"image_type": "vhd"}, "qcow2 or raw"),
    ({"arch": "sparc"}, "unknown architecture"),
])
def test_bad_settings(default_lab, over, needle):
    with pytest.raises(LabError, match=needle):
        amphora.settings(default_lab, **over)


def test_agent_conf_has_the_templates_keys(default_lab):
    text = amphora_check.agent_conf(default_lab, "a1b2", "hb")
    for key in ("base_cert_dir", "base_path", "bind_host", "bind_port", "haproxy_cmd",
                "controller_ip_port_list", "heartbeat_key", "agent_server_ca", "agent_server_cert",
                "agent_request_read_timeout", "amphora_id", "amphora_udp_driver",
                "agent_tls_protocol", "loadbalancer_topology"):
        assert f"\n{key} = " in text
    assert "amphora_id = a1b2" in text


def test_config_drive_is_novas_layout(tmp_path):
    import pycdlib
    files = {"/etc/octavia/amphora-agent.conf": b"[DEFAULT]\n",
             "/etc/octavia/certs/server.pem": b"PEM"}
    iso_path = amphora_check.config_drive(tmp_path / "cd.iso", "abc", files)
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "config-2"
        import io
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/openstack/latest/meta_data.json")
        meta = json.loads(buf.getvalue())
        assert meta["uuid"] == "abc"
        paths = {f["path"]: f["content_path"] for f in meta["files"]}
        assert set(paths) == set(files)
        for dest, content_path in paths.items():
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/openstack" + content_path)
            assert buf.getvalue() == files[dest]
    finally:
        iso.close()


# --------------------------------------------------------------------------
# bad input through the CLI
# --------------------------------------------------------------------------
def test_cli_unknown_base_os(cli):
    assert_one_line_error(cli("build-amphora", "--base-os", "gentoo"), "--base-os gentoo", "unknown base OS")


def test_cli_size_below_need(cli):
    assert_one_line_error(cli("build-amphora", "--size", "1"), "--size 1", "at least 2 GB")


@pytest.mark.integration
def test_cli_docker_not_reachable(cli, ws):
    proc = cli("build-amphora", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert_one_line_error(proc, "DOCKER_HOST=unix:///nonexistent/docker.sock")
    assert not (ws.cache / "dockerd.log").exists()      # no dockerd started for an explicit host


@pytest.mark.integration
def test_octavia_release_that_does_not_exist(default_lab):
    with pytest.raises(LabError, match="no such Octavia release"):
        docker_engine.check_octavia_release(default_lab, "0.0.1")
    docker_engine.check_octavia_release(default_lab, default_lab.octavia.amphora.octavia_version)


@pytest.mark.integration
def test_cli_octavia_release_that_does_not_exist(cli, ws, tmp_path):
    lab = lab_file(tmp_path, **{"octavia.amphora.octavia_version": "1.99.0"})
    proc = cli("build-amphora", "--lab", str(lab))
    assert_one_line_error(proc, "octavia 1.99.0", "no such Octavia release")
    assert not (ws.cache / "dockerd.log").exists()      # checked before any engine is started


# --------------------------------------------------------------------------
# slow: the real build and boot
# --------------------------------------------------------------------------
def _image_tree(image: Path, tmp: Path):
    """Yield a function listing/reading paths inside the image's root filesystem
    (raw copy, root partition on a read-only loop device, debugfs)."""
    raw = tmp / "amphora.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    part = max(table["partitions"], key=lambda p: p["size"])
    sector = table.get("sectorsize", 512)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only",
                           "--offset", str(part["start"] * sector),
                           "--sizelimit", str(part["size"] * sector), str(raw)],
                          check=True, capture_output=True, text=True).stdout.strip()
    return loop, raw


def _debugfs(loop: str, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, loop], capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.integration
def test_build_boot_and_rebuild(amphora_build, tmp_path, report):
    """Cold build from a clean cache, image contents, amphora-check (the load
    balancer, driven by Octavia's controller code), up to date, forced warm."""
    import time
    default_lab, ws = amphora_build.lab, amphora_build.ws
    out, cold = amphora_build.outcomes, amphora_build.seconds
    assert out[-1].status == "built"
    image = ws.artifacts / "images" / "amphora-x64-haproxy.qcow2"
    assert image.is_file()
    assert not list(image.parent.glob(".*.part"))
    rec = Manifest(ws.artifacts).get(image)
    assert rec["kind"] == "amphora"
    meta = rec["meta"]
    assert meta["base_os"] == "debian" and meta["release"] == "bookworm"
    assert meta["octavia_version"] == default_lab.octavia.amphora.octavia_version
    assert meta["dib_version"] == docker_engine.DIB_VERSION
    assert "amphora-agent" in meta["elements"]
    assert meta["virtual_size"] == 2 * 2**30, meta          # --size 2 (DIB's GB are GiB)

    # qemu-img check is clean
    assert_compressed_and_clean(image)

    # contents: haproxy, the agent and its unit; no build CA, no pip cache
    loop, raw = _image_tree(image, tmp_path)
    try:
        assert "haproxy" in _debugfs(loop, "ls -l /usr/sbin")
        assert "amphora-agent" in _debugfs(loop, "ls -l /opt/amphora-agent-venv/bin")
        assert "amphora-agent.service" in _debugfs(loop, "ls -l /usr/lib/systemd/system")
        for gone in ("/usr/local/share/labforge/build-ca.crt", "/root/.cache/pip", "/tmp/pip/http",
                     "/tmp/pip/wheels"):
            assert "File not found" in subprocess.run(
                ["debugfs", "-R", f"stat {gone}", loop], capture_output=True, text=True).stderr, gone
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        raw.unlink()

    # the cache holds the package layer (the bootstrap tarball with every
    # package the elements install) and the pip cache next to it
    s = amphora.settings(default_lab)
    layer = ws.cache / "amphora" / "dib" / "layers" / amphora.layer_name(default_lab, s)
    tarball = layer / "debootstrap-debian-bookworm-amd64.tar.gz"
    assert tarball.is_file()
    assert any((layer / "pip").rglob("*.whl")) or any((layer / "pip").rglob("http*"))
    packages = installed_packages(image, tmp_path)
    assert {"haproxy", "keepalived", "cloud-init", "ipvsadm"} <= packages

    # boot it the way Nova would and prove it as a load balancer
    check = amphora_check.check_amphora(default_lab, ws)
    assert check[-1].status == "passed"
    assert "refused" in check[-1].detail
    report("amphora-check:\n" + (ws.artifacts / "logs" / "amphora-check-report.txt").read_text())

    # unchanged inputs: up to date
    again = amphora.build_amphora(default_lab, ws)
    assert again[-1].status == "up to date"

    # forced: rebuilt from the package layer, with the same packages
    t1 = time.monotonic()
    forced = amphora.build_amphora(default_lab, ws, force=True)
    warm = time.monotonic() - t1
    assert forced[-1].status == "built"
    log = (ws.artifacts / "logs" / "amphora.log").read_text(errors="replace")
    assert f"{layer}/{tarball.name} found in cache. Using." in log
    assert Manifest(ws.artifacts).get(image)["sha256"] == sha256_file(image)
    assert installed_packages(image, tmp_path) == packages
    assert_compressed_and_clean(image)
    report(f"amphora: cold build {cold / 60:.1f} min, forced warm rebuild {warm / 60:.1f} min, "
          f"boot {check[-1].seconds:.0f}s")


def test_cli_overrides_reach_the_dib_environment(default_lab, ws, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    lb = amphora.with_build_settings(default_lab, apt_mirror="http://mirror.example/debian/",
                                     pip_index="https://pypi.example/simple", ca_bundle=str(ca))
    env = amphora.dib_environment(lb, ws, amphora.settings(lb))
    assert env["DIB_DISTRIBUTION_MIRROR"] == "http://mirror.example/debian"
    assert env["PIP_INDEX_URL"] == "https://pypi.example/simple"
    assert docker_engine.builder_inputs(lb, amphora.settings(lb))["ca_bundle"] == ca
    assert env["LABFORGE_BUILD_CA"] == docker_engine.BUILDER_CA
    with pytest.raises(LabError, match="--ca-bundle"):
        amphora.with_build_settings(default_lab, ca_bundle=str(tmp_path / "missing.pem"))


@pytest.mark.slow
@pytest.mark.integration
def test_failed_build_names_the_script_and_keeps_the_cache(cli, ws):
    """A release the mirror does not have: debootstrap fails inside DIB."""
    (ws.cache / "amphora" / "dib").mkdir(parents=True)
    marker = ws.cache / "amphora" / "dib" / "kept"
    marker.write_text("x")
    proc = cli("build-amphora", "--release", "nosuchrelease")
    line = assert_one_line_error(proc, "element script root.d/08-debootstrap failed", "amphora.log",
                                 where="any")            # progress lines come before it
    assert "nosuchrelease" in proc.stderr.split(line, 1)[1]   # the tool's last lines follow
    images = ws.artifacts / "images"
    assert not list(images.glob("amphora-x64-haproxy.*"))
    assert not list(images.glob(".*.part"))
    assert marker.is_file()


@pytest.mark.integration
def test_cli_builder_from_that_cannot_be_pulled(cli, ws, tmp_path):
    """build.builder_from names an image the engine lacks and no registry serves."""
    lab = lab_file(tmp_path, **{"build.builder_from": "registry.invalid/debian:bookworm"})
    proc = cli("build-amphora", "--lab", str(lab))
    assert_one_line_error(proc, "build.builder_from: cannot pull registry.invalid/debian:bookworm",
                          where="any")
    images = ws.artifacts / "images"
    assert not images.exists() or not any(images.iterdir())

