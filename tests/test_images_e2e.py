"""End to end: build the Debian base with diskimage-builder, make the
default lab's overlays, boot broker1 with its seed and prove from inside
the guest that cloud-init applied it (hostname, a written file, the
marker).  Minutes long (a DIB build and a TCG boot)."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from builders.artifacts import baseimage

from builders.checks import bootcheck

from builders.tools import dib

from builders.artifacts import overlays

from builders.artifacts import seed as seeds
from builders.core.fsutil import private_dir, sha256_file
from builders.core.manifest import Manifest
from helpers import assert_one_line_error, lab_file
from imagetools import assert_compressed_and_clean, installed_packages

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _lab_ssh_key(ws) -> None:
    """What `invoke certs` leaves for seeds: certs/ssh/lab_ed25519(.pub)."""
    key = ed25519.Ed25519PrivateKey.generate()
    d = private_dir(ws.certs_dir() / "ssh")
    (d / "lab_ed25519").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (d / "lab_ed25519").chmod(0o600)
    (d / "lab_ed25519.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" lab\n")


def test_dib_base_overlays_and_boot_check_broker1(tmp_path, ws, cli, report):
    token = secrets.token_hex(8)
    # the default lab; broker1 also writes a file and prints what the guest sees
    lab_path = lab_file(tmp_path, hosts={"broker1": {
        "write_files": [{"path": "/etc/labforge-e2e", "content": f"written-{token}\n"}],
        "runcmd": ["echo \"e2e-hostname=$(hostname)\" > /dev/ttyS0",
                   "echo \"e2e-file=$(cat /etc/labforge-e2e)\" > /dev/ttyS0"],
    }})
    from builders.core import lab as labmod
    lab = labmod.load(lab_path)
    assert lab.base_image.source == "build" and lab.base_image.distro == "debian"

    [base] = baseimage.build_base_image(lab, ws)
    image = ws.artifacts / "images" / "debian-12.qcow2"
    assert base.status == "built" and base.paths == [image]
    rec = Manifest(ws.artifacts).get(image)
    assert rec["sha256"] == sha256_file(image)
    assert rec["meta"]["virtual_size"] == lab.base_image.size << 30
    assert_compressed_and_clean(image)
    log = ws.artifacts / "logs" / "base-image-debian-12.log"
    assert "mmdebstrap is installed; use it" in log.read_text(errors="replace")
    [layer] = (ws.cache / "dib" / "layers").glob("bookworm-*/debootstrap-debian-bookworm-amd64.tar.gz")
    # the image holds the layer's packages; a rebuild from the layer installs the same set
    installed = installed_packages(image, tmp_path)
    assert set(baseimage.LAYER_PACKAGES) <= installed, set(baseimage.LAYER_PACKAGES) - installed
    # a forced rebuild starts from the cached package layer; that image is the one booted below
    [warm] = baseimage.build_base_image(lab, ws, force=True)
    assert warm.status == "built", warm.line()
    assert f"{layer} found in cache. Using." in log.read_text(errors="replace")
    assert installed_packages(image, tmp_path) == installed
    assert_compressed_and_clean(image)
    rec = Manifest(ws.artifacts).get(image)
    # a CI job that restores cache/ but not artifacts/ reuses the built image
    sha = rec["sha256"]
    image.unlink()
    [again] = baseimage.build_base_image(lab, ws)
    assert again.status == "built" and "reused" in again.detail
    assert sha256_file(image) == sha

    outs = overlays.build_overlays(lab, ws)
    assert [o.status for o in outs] == ["built"] * 3

    _lab_ssh_key(ws)
    seeds.build_seed_isos(lab, ws, hosts=["broker1"])
    overlay = ws.artifacts / "vms" / "broker1.qcow2"
    before = sha256_file(overlay)

    [res] = bootcheck.boot_check(lab, ws, "broker1", timeout=1200,
                                 expect=["e2e-hostname=broker1", f"e2e-file=written-{token}"])
    assert res.status == "passed", res.line()
    console = (ws.artifacts / "logs" / "boot-broker1.console.log").read_text(errors="replace")
    assert seeds.seed_marker(lab, "broker1", ws) in console
    assert "e2e-hostname=broker1" in console and f"e2e-file=written-{token}" in console
    report(res.line())
    # the user's overlay was only read
    assert sha256_file(overlay) == before and overlays.written_bytes(overlay) == 0

    # a boot that cannot finish in time: one line, then the last console lines
    proc = cli("boot-check", "--lab", str(lab_path), "--host", "broker1", "--timeout", "15")
    line = assert_one_line_error(proc, "boot-check broker1: no cloud-init result within 15s", where="any")
    assert proc.stderr.rstrip().splitlines()[-1] != line    # the console tail follows
    assert sha256_file(overlay) == before


def test_dib_base_in_builder_container_boots_broker1(tmp_path, ws, monkeypatch, report):
    """base_image.builder: container: DIB runs in the amphora builder image
    (built first when missing), the result is a bootable qcow2."""
    from builders.core import lab as labmod
    from builders.tools import docker_engine, qemu_img
    lab = labmod.load(lab_file(tmp_path, base_image={"builder": "container"}))
    assert baseimage.dib_place(lab).kind == "container"

    [base] = baseimage.build_base_image(lab, ws)
    image = ws.artifacts / "images" / "debian-12.qcow2"
    assert base.status == "built" and base.paths == [image], base.line()
    info = qemu_img.info(image)
    assert info["format"] == "qcow2" and info["virtual-size"] == lab.base_image.size << 30
    assert_compressed_and_clean(image)
    rec = Manifest(ws.artifacts).get(image)
    assert rec["sha256"] == sha256_file(image)
    tag = rec["meta"]["builder"]
    assert tag.startswith(docker_engine.BUILDER_REPO + ":") and tag in base.detail
    assert rec["tools"]["builder-image"] == tag
    assert rec["tools"]["diskimage-builder"] == docker_engine.DIB_VERSION
    log = (ws.artifacts / "logs" / "base-image-debian-12.log").read_text(errors="replace")
    assert f"(in container {tag})" in log.splitlines()[0]
    assert "finalise.d" in log
    assert not list(image.parent.glob(".*.dib"))          # no temp dir left behind

    # unchanged inputs, same place: up to date without running anything
    [again] = baseimage.build_base_image(lab, ws)
    assert again.status == "up to date"
    # `auto` prefers a host that has DIB (the package layer applies there) ...
    auto = labmod.load(lab_file(tmp_path, filename="auto.yaml"))
    assert baseimage.dib_place(auto).kind == "host"
    # ... and on a host without it finds that image in the running engine, same digest
    monkeypatch.setattr(dib, "DIB_VENV", tmp_path / "no-venv-dib")
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    place = baseimage.dib_place(auto)
    assert (place.kind, place.tag) == ("container", tag)
    [again] = baseimage.build_base_image(auto, ws)
    assert again.status == "up to date"
    monkeypatch.undo()

    overlays.build_overlays(lab, ws, hosts=["broker1"])
    _lab_ssh_key(ws)
    seeds.build_seed_isos(lab, ws, hosts=["broker1"])
    [res] = bootcheck.boot_check(lab, ws, "broker1", timeout=1200)
    assert res.status == "passed", res.line()
    report(f"{base.line()}\n{res.line()}")


def test_dib_failure_in_the_container_is_the_host_line(tmp_path, ws):
    """A failing element script in the builder container: the same one line
    (script and log) as on the host, the last lines after it, nothing left."""
    from builders.tools import dib
    from builders.core import lab as labmod
    from builders.core.errors import LabError
    lab = labmod.load(lab_file(tmp_path, base_image={"builder": "container"}))
    rel = baseimage.release(lab)
    container = baseimage._builder_container(lab, ws, rel, baseimage.dib_place(lab))
    out = ws.artifacts / "images" / "bad.qcow2"
    with pytest.raises(LabError) as err:
        dib.disk_image_create(lab, ws, name="bad", elements=["debian-minimal"], output=out,
                              env={"DIB_RELEASE": "nosuchrelease"}, container=container)
    line = str(err.value)
    assert "element script root.d/08-debootstrap failed" in line and "bad.log" in line, line
    assert "\n" not in line and any("nosuchrelease" in t for t in err.value.details)
    log = (ws.artifacts / "logs" / "bad.log").read_text(errors="replace")
    assert f"(in container {container.image})" in log.splitlines()[0]
    assert list(out.parent.iterdir()) == []
    assert not [c for c in container.cli.containers.list(all=True)
                if str(ws.root) in str(c.attrs)]
