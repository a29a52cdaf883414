"""Where the DIB base build runs (base_image.builder): the decision, the
shared command line, bad input.  Fast: no engine is needed (the real
container build is in test_images_e2e.py)."""

from __future__ import annotations

from builders.artifacts import baseimage
from builders.tools import dib, docker_engine
from builders.tools.buildenv import ca_bundle
from helpers import assert_one_line_error, lab_file, lab_from

NOWHERE = "unix:///nonexistent/docker.sock"


def test_builder_defaults_to_auto(default_lab):
    assert default_lab.base_image.builder == "auto"


def test_cli_unknown_builder_is_a_lab_error(cli, tmp_path):
    lab = lab_file(tmp_path, base_image={"builder": "podman"})
    assert_one_line_error(cli("check-lab", "--lab", str(lab)), "base_image.builder",
                          "'podman'", "auto, host, container")


def test_auto_without_engine_is_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    place = baseimage.dib_place(lab_from(tmp_path))
    assert place.kind == "host" and place.tag is None
    assert place.dib_version == dib.dib_version()


def test_host_and_container_need_no_engine_to_decide(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    assert baseimage.dib_place(lab_from(tmp_path, base_image={"builder": "host"})).kind == "host"
    place = baseimage.dib_place(lab_from(tmp_path, base_image={"builder": "container"}))
    assert (place.kind, place.dib_version) == ("container", docker_engine.DIB_VERSION)


def test_digest_follows_the_dib_version_not_the_place(tmp_path):
    host = lab_from(tmp_path, filename="host.yaml", base_image={"builder": "host"})
    cont = lab_from(tmp_path, filename="cont.yaml", base_image={"builder": "container"})
    rel = baseimage.release(host)
    assert baseimage.build_digest(host, rel, "3.43.0") == baseimage.build_digest(cont, rel, "3.43.0")
    assert baseimage.build_digest(host, rel, "3.43.0") != baseimage.build_digest(host, rel, "3.44.0")


def test_one_command_line_for_host_and_container(default_lab, ws, tmp_path):
    """Same argv (but the executable) and environment; every host path the
    environment names is mounted at the same path in the container."""
    out = ws.artifacts / "images" / "debian-12.qcow2"
    work = out.parent / ".debian-12.qcow2.x.dib"
    kw = dict(elements=baseimage.BUILD_ELEMENTS, workdir=work, packages=baseimage.BUILD_PACKAGES,
              image_size=4, env={"DIB_RELEASE": "bookworm"})
    host = dib.dib_command(default_lab, ws, exe="/x/.venv-dib/bin/disk-image-create", **kw)
    cont = dib.dib_command(default_lab, ws, exe="disk-image-create", **kw)
    assert host.argv[1:] == cont.argv[1:] and host.env == cont.env and host.built == cont.built
    assert "-p" in cont.argv and "ifupdown,isc-dhcp-client" in cont.argv
    mounts = dib.container_mounts(default_lab, ws, out)
    assert mounts["/dev"]["bind"] == "/dev"
    paths = [v for k, v in cont.env.items() if v.startswith("/")] + [str(host.built)]
    for value in paths:
        covering = [src for src, m in mounts.items()
                    if m["bind"] == src and src != "/dev" and
                    (value == src or value.startswith(src.rstrip("/") + "/"))]
        assert covering, (value, mounts)
    bundle = str(ca_bundle(default_lab).resolve())
    assert mounts[bundle]["mode"] == "ro"


def test_cli_container_without_engine_is_one_docker_line(cli, ws, tmp_path):
    lab = lab_file(tmp_path, base_image={"builder": "container"})
    proc = cli("base-image", "--lab", str(lab), env={"DOCKER_HOST": NOWHERE})
    assert_one_line_error(proc, f"DOCKER_HOST={NOWHERE}", where="any")
    assert_one_line_error(proc, "docker: no engine answers")
    assert not (ws.cache / "dockerd.log").exists()      # an explicit host is never started
    assert not list(ws.artifacts.rglob("*.qcow2"))
