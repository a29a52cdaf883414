"""Publishing to Glance against a real Keystone and a real Glance (uWSGI, SQLite,
file store, keystonemiddleware auth) started on 127.0.0.1 for this module.

What a user checks: the image is active with the tags/properties asked, its
os_hash_value is the file's sha512, the bytes downloaded are the file's, a
re-upload makes no new image, rotation leaves one tagged image, a cloud that
refuses direct uploads gets the glance-direct import, and faults (Glance
killed mid-upload, Ctrl-C, SIGTERM, a wrong password) give one clear line and
leave no queued/saving/killed image behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from builders.publishers import glance
from builders.core.errors import LabError
from builders.core.manifest import Manifest, input_digest
from builders.core.workspace import Workspace
from helpers import INVOKE, assert_one_line_error, make_qcow2
from tests.openstack_services import (  # noqa: F401 - pytest fixtures
    kill_glance_mid_upload, on_upload, openstack_services, services)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture
def clouds(services, tmp_path, monkeypatch):
    """A clouds.yaml with cloud `lab` (admin on the service project) and
    `lab-badpw` (a wrong password); OS_* variables cleared."""
    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    path = services.write_clouds_yaml(tmp_path / "clouds.yaml", {
        "lab": services.cloud_config(),
        "lab-badpw": services.cloud_config(password="not-the-password-x9"),
    })
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    return path


def sparse_image(path: Path, gib: float = 1) -> Path:
    """A raw image that is fast to read (sparse) and slow enough to send."""
    with open(path, "wb") as fh:
        fh.truncate(int(gib * (1 << 30)))
        fh.write(os.urandom(1 << 20))
    return path


def record(ws: Workspace, rel: str, kind: str, mib: int = 24) -> Path:
    path = make_qcow2(ws.artifact_dir("images") / Path(rel).name, data_mib=mib, random=True)
    Manifest(ws.artifacts).record(path, kind, input_digest(rel, kind))
    return path


def sha512(path: Path) -> str:
    return hashlib.sha512(path.read_bytes()).hexdigest()


def admin_api(services, project: str = "service"):
    conn = services.admin_connection(project=project)
    return conn


def raw(conn, image_id: str) -> dict:
    """The image as Glance's API shows it (custom properties at the top level)."""
    return conn.image.get(f"/images/{image_id}").json()


def images_by_name(conn, name: str) -> list:
    return [i for i in conn.image.images() if i.name == name]


def labforge_images(conn) -> list[dict]:
    """Every image labforge made in any status."""
    return [r for r in (raw(conn, i.id) for i in conn.image.images()) if glance.UPLOAD_ID in r]


def stuck_images(conn) -> list[tuple[str, str]]:
    return [(i["name"], i["status"]) for i in labforge_images(conn) if i["status"] in glance.STUCK]


@pytest.fixture
def glance_refuses_direct_upload(services):
    """Glance with the oslo.policy rule ``upload_image: "!"``: PUT /file is
    refused (403) for everybody, the glance-direct import still works."""
    services.set_glance_policy({"upload_image": "!"})
    yield services
    services.set_glance_policy(None)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_upload_via_clouds_yaml_active_hash_tags_props_and_bytes(clouds, services, ws,
                                                                 default_lab, tmp_path):
    img_path = record(ws, "images/debian-12.qcow2", "base-image")
    out = glance.upload_image(default_lab, ws, image="debian-12", name="lf-debian-12",
                              tags=["lab", "debian"], properties=["os_distro=debian",
                                                                  "os_version=12"],
                              cloud="lab", method="direct")
    assert out[0].status == "built", out[0].line()
    conn = admin_api(services)
    [img] = images_by_name(conn, "lf-debian-12")
    assert img.status == "active"
    assert img.disk_format == "qcow2" and img.container_format == "bare"
    assert set(img.tags) == {"lab", "debian"}
    assert raw(conn, img.id)["os_distro"] == "debian" and raw(conn, img.id)["os_version"] == "12"
    assert img.hash_algo == "sha512" and img.hash_value == sha512(img_path)
    assert img.owner == conn.current_project_id
    data = b"".join(conn.image.download_image(img, stream=True).iter_content(1 << 20))
    assert data == img_path.read_bytes()
    meta = Manifest(ws.artifacts).get("images/debian-12.qcow2")["meta"]["glance"]["lab"]
    assert meta["image_id"] == img.id and meta["os_hash_value"] == img.hash_value
    assert meta["tags"] == ["debian", "lab"]
    assert services.admin_password not in json.dumps(Manifest(ws.artifacts).load())

    # the same file again: no new image, missing tag and property added
    out = glance.upload_image(default_lab, ws, image=str(img_path), name="lf-debian-12",
                              tags=["lab", "extra"], properties=["os_admin_user=debian"],
                              visibility="shared", cloud="lab")
    assert out[0].status == "up to date" and "reused" in out[0].detail, out[0].line()
    [again] = images_by_name(conn, "lf-debian-12")
    assert again.id == img.id
    assert set(again.tags) == {"lab", "debian", "extra"}
    assert raw(conn, img.id)["os_admin_user"] == "debian"
    assert again.visibility == "shared"

    # and once more, nothing to add: up to date, the manifest is not rewritten
    # (it is replaced by a rename when written: a new inode, whatever the content)
    man = Manifest(ws.artifacts).path
    before = (man.stat().st_ino, man.stat().st_mtime_ns, man.read_bytes())
    out = glance.upload_image(default_lab, ws, image=str(img_path), name="lf-debian-12",
                              tags=["lab", "extra"], properties=["os_admin_user=debian"],
                              visibility="shared", cloud="lab")
    assert out[0].status == "up to date", out[0].line()
    assert (man.stat().st_ino, man.stat().st_mtime_ns, man.read_bytes()) == before


def test_auto_is_a_direct_upload(clouds, services, ws, default_lab, tmp_path):
    """Glance offers glance-direct here, yet auto uploads directly, as
    `openstack image create --file` does (one write instead of stage + copy)."""
    assert "glance-direct" in glance.connect("lab").import_methods()
    f = make_qcow2(tmp_path / "auto.qcow2", data_mib=2, random=True)
    out = glance.upload_image(default_lab, ws, image=str(f), name="lf-auto", cloud="lab")
    assert out[0].status == "built" and "direct upload of" in out[0].detail, out[0].line()
    assert "glance-direct" not in out[0].detail
    [img] = images_by_name(admin_api(services), "lf-auto")
    assert img.status == "active" and img.hash_value == sha512(f)


def test_refused_direct_upload_falls_back_to_glance_direct(clouds, glance_refuses_direct_upload,
                                                          ws, default_lab, cli, tmp_path):
    services = glance_refuses_direct_upload
    # 64 MiB: far more than is sent before Glance answers, so over TLS the
    # 403 comes as a lost connection (see glance.upload._send)
    f = sparse_image(tmp_path / "refused.raw", gib=1 / 16)
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    # asked for direct: one line saying what Glance answered and what to do, no image left
    proc = cli("glance-upload", "--image", str(f), "--name", "lf-refused", "--cloud", "lab",
               "--method", "direct", env=env)
    assert_one_line_error(proc, "refused the direct upload", "HTTP 403", "upload_image",
                          "was deleted", "--method glance-direct", where="last")
    conn = admin_api(services)
    assert images_by_name(conn, "lf-refused") == []
    # auto: the refused image is deleted, the file goes through the import
    proc = cli("glance-upload", "--image", str(f), "--name", "lf-refused", "--cloud", "lab",
               env=env)
    assert proc.returncode == 0, proc.stderr
    assert "glance-direct upload" in proc.stdout and "direct upload refused (HTTP 403)" \
        in proc.stdout and "hash verified" in proc.stdout, proc.stdout
    [img] = images_by_name(conn, "lf-refused")
    assert img.status == "active" and img.hash_value == sha512(f)
    assert [i["id"] for i in labforge_images(conn) if i["name"] == "lf-refused"] == [img.id]
    assert stuck_images(conn) == []


def test_upload_via_os_env_and_glance_direct_import(services, ws, default_lab, cli, tmp_path):
    img_path = make_qcow2(tmp_path / "plain.qcow2", data_mib=8, random=True)
    env = {k: "" for k in os.environ if k.startswith("OS_")}
    env.update(services.os_env(), OS_CLIENT_CONFIG_FILE=str(tmp_path / "none.yaml"))
    proc = cli("glance-upload", "--image", str(img_path), "--name", "lf-env",
               "--tag", "env", "--property", "purpose=test", "--method", "glance-direct",
               env=env)
    assert proc.returncode == 0, proc.stderr
    assert "glance-direct upload" in proc.stdout and "hash verified" in proc.stdout
    assert services.admin_password not in proc.stdout + proc.stderr
    conn = admin_api(services)
    [img] = images_by_name(conn, "lf-env")
    assert img.status == "active" and img.tags == ["env"]
    assert raw(conn, img.id)["purpose"] == "test"
    assert img.hash_value == sha512(img_path)
    assert glance.OWNER not in raw(conn, img.id)   # the in-flight mark is gone once active


def test_application_credential_auth(services, ws, default_lab, tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    cred_id, secret = services.application_credential()
    path = services.write_clouds_yaml(tmp_path / "clouds.yaml", {"appcred": {
        "auth_type": "v3applicationcredential",
        "auth": {"auth_url": services.auth_url, "application_credential_id": cred_id,
                 "application_credential_secret": secret},
        "region_name": "RegionOne", "cacert": str(services.ca)}})
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    monkeypatch.setenv("OS_CLOUD", "appcred")
    img_path = make_qcow2(tmp_path / "appcred.qcow2", data_mib=2, random=True)
    out = glance.upload_image(default_lab, ws, image=str(img_path), name="lf-appcred")
    assert out[0].status == "built"
    assert images_by_name(admin_api(services), "lf-appcred")[0].status == "active"


def test_publish_amphora_rotation(clouds, services, ws, default_lab):
    tag, name = default_lab.octavia.amp_image_tag, default_lab.octavia.image_name
    rel = "images/amphora-x64-haproxy.qcow2"
    record(ws, rel, "amphora", mib=4)
    first = glance.publish_amphora(default_lab, ws, cloud="lab")
    assert first[0].status == "built"
    first_id = Manifest(ws.artifacts).get(rel)["meta"]["glance"]["lab"]["image_id"]
    # a rebuilt amphora (new content), published again with --keep 2
    path = record(ws, rel, "amphora", mib=5)
    second = glance.publish_amphora(default_lab, ws, cloud="lab", keep=2)
    assert second[0].status == "built"
    second_id = Manifest(ws.artifacts).get(rel)["meta"]["glance"]["lab"]["image_id"]
    assert second_id != first_id
    conn = admin_api(services)
    tagged = [i.id for i in conn.image.images(tag=[tag])]
    assert tagged == [second_id]
    new = raw(conn, second_id)
    assert new["name"] == name and new["os_hash_value"] == sha512(path)
    assert new["hw_architecture"] == "x86_64" and new["hw_rng_model"] == "virtio"
    assert new["os_distro"] == "debian" and new["os_version"] == "12"
    assert new["min_disk"] == default_lab.octavia.amphora.size and new["min_ram"] == 1024
    old = conn.image.get_image(first_id)
    assert old.status == "active" and tag not in old.tags
    # publishing the same amphora again: reused, still the only tagged one
    third = glance.publish_amphora(default_lab, ws, cloud="lab")
    assert third[0].status == "up to date"
    assert [i.id for i in conn.image.images(tag=[tag])] == [second_id]
    # a third build with --keep 1 --deactivate-old: older ones deactivated, not deleted
    record(ws, rel, "amphora", mib=6)
    glance.publish_amphora(default_lab, ws, cloud="lab", keep=1, deactivate_old=True)
    third_id = Manifest(ws.artifacts).get(rel)["meta"]["glance"]["lab"]["image_id"]
    assert [i.id for i in conn.image.images(tag=[tag])] == [third_id]
    assert conn.image.get_image(second_id).status == "deactivated"
    assert conn.image.get_image(first_id).status == "deactivated"
    # a fourth with --keep 2: the two newest stay, older ones are deleted
    record(ws, rel, "amphora", mib=7)
    glance.publish_amphora(default_lab, ws, cloud="lab", keep=2)
    fourth_id = Manifest(ws.artifacts).get(rel)["meta"]["glance"]["lab"]["image_id"]
    left = {i.id for i in conn.image.images() if i.name == name}
    assert left == {third_id, fourth_id}
    assert [i.id for i in conn.image.images(tag=[tag])] == [fourth_id]


def test_tls_cacert_and_insecure(clouds, services, cli, tmp_path):
    """Keystone and Glance serve HTTPS with a test CA: without the CA the
    upload is refused with one line; --os-cacert or --insecure make it work."""
    assert services.auth_url.startswith("https://")
    plain = services.cloud_config()
    plain.pop("cacert")
    clouds = services.write_clouds_yaml(tmp_path / "clouds.yaml", {"lab-tls": plain})
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    f = make_qcow2(tmp_path / "tls.qcow2", data_mib=1, random=True)
    proc = cli("glance-upload", "--image", str(f), "--name", "lf-tls", "--cloud", "lab-tls", env=env)
    assert_one_line_error(proc, "TLS verification", "--os-cacert")
    proc = cli("glance-upload", "--image", str(f), "--name", "lf-tls", "--cloud", "lab-tls",
               "--os-cacert", str(services.ca), env=env)
    assert proc.returncode == 0, proc.stderr
    proc = cli("glance-upload", "--image", str(f), "--name", "lf-tls", "--cloud", "lab-tls",
               "--insecure", env=env)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr
    assert len(images_by_name(admin_api(services), "lf-tls")) == 1


def test_wrong_password_one_line_no_image(clouds, services, cli, tmp_path):
    img_path = make_qcow2(tmp_path / "badpw.qcow2", data_mib=1, random=True)
    proc = cli("glance-upload", "--image", str(img_path), "--name", "lf-badpw",
               "--cloud", "lab-badpw", env={"OS_CLIENT_CONFIG_FILE": str(clouds)})
    assert_one_line_error(proc, "refused user admin", "HTTP 401", "lab-badpw")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not-the-password-x9" not in proc.stderr
    assert images_by_name(admin_api(services), "lf-badpw") == []


@pytest.mark.parametrize("method", ["direct", "glance-direct"])
def test_glance_killed_mid_upload_image_deleted_when_back(clouds, services, ws, default_lab,
                                                          tmp_path, on_upload, method):
    """Glance killed mid-upload and back a moment later (a restart): the
    failing run itself deletes its image; nothing is left for the next run."""
    big = sparse_image(tmp_path / "big.raw")

    killed, failed = [], []

    def restart():
        killed.append(True)
        services.kill_glance()
        try:
            services.start_glance()
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)
    on_upload(restart)
    with pytest.raises(LabError) as err:
        glance.upload_image(default_lab, ws, image=str(big), name=f"lf-back-{method}",
                            cloud="lab", method=method, cleanup_wait=300)
    assert killed, "Glance was not killed during the upload"
    assert not failed, f"Glance did not restart: {failed[0]}"
    msg = str(err.value)
    assert "\n" not in msg and "unreachable" in msg and "was deleted" in msg, msg
    assert "next labforge upload" not in msg, msg
    assert services.admin_password not in msg
    conn = admin_api(services)
    assert stuck_images(conn) == []
    assert images_by_name(conn, f"lf-back-{method}") == []


def test_glance_killed_mid_upload_stays_down_then_next_run_cleans(clouds, services, cli, tmp_path,
                                                                  kill_glance_mid_upload):
    """Glance killed and still down when the run gives up deleting (30 s):
    one line saying so; once Glance is back, the next run removes the image."""
    big = sparse_image(tmp_path / "big.raw")
    state = kill_glance_mid_upload(threshold=16 << 20)
    proc = cli("glance-upload", "--image", str(big), "--name", "lf-killed", "--cloud", "lab",
               "--method", "direct", env={"OS_CLIENT_CONFIG_FILE": str(clouds)})
    assert state["fired"], "Glance was not killed during the upload"
    assert_one_line_error(proc, "unreachable", "could not be deleted", "for 30s",
                          "next labforge upload", where="last")
    assert services.admin_password not in proc.stderr

    # Glance back: the image the killed upload left is there; the next labforge run removes it
    services.start_glance()
    conn = admin_api(services)
    assert [s for n, s in stuck_images(conn) if n == "lf-killed"] == ["saving"]
    small = make_qcow2(tmp_path / "after.qcow2", data_mib=1, random=True)
    proc = cli("glance-upload", "--image", str(small), "--name", "lf-after-kill",
               "--cloud", "lab", env={"OS_CLIENT_CONFIG_FILE": str(clouds)})
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 stuck image" in proc.stdout, proc.stdout
    assert stuck_images(conn) == []
    assert images_by_name(conn, "lf-killed") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_mid_upload_deletes_image(clouds, services, tmp_path, on_upload, sig):
    """Ctrl-C, or SIGTERM as a cancelled CI job sends it, to a running
    `invoke glance-upload`: the image is deleted before the run ends."""
    big = sparse_image(tmp_path / "big.raw")
    name = f"lf-{signal.Signals(sig).name.lower()}"
    env = dict(os.environ, LABFORGE_WORKDIR=str(tmp_path / "ws"))
    proc = subprocess.Popen(
        [*INVOKE, "glance-upload", "--image", str(big), "--name", name, "--cloud", "lab"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = on_upload(lambda: proc.send_signal(sig))
    out, err = proc.communicate(timeout=600)
    assert state["fired"], "the upload finished before the signal"
    assert proc.returncode in (130, 143), (proc.returncode, err)   # handled, not killed by it
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    conn = admin_api(services)
    assert images_by_name(conn, name) == []
    assert stuck_images(conn) == []


def test_interrupt_right_after_create_deletes_image(clouds, services, ws, default_lab, tmp_path,
                                                    monkeypatch):
    """Ctrl-C arriving while Glance's answer to the create is on its way (the
    id is not known yet): the image is found by its upload id and deleted.
    Fault injection into labforge's own Cloud.create_image (Glance is real):
    a signal cannot be timed into that gap from outside."""
    f = make_qcow2(tmp_path / "gap.qcow2", data_mib=1, random=True)
    real_create = glance.Cloud.create_image

    def create(self, attrs):
        real_create(self, attrs)
        raise KeyboardInterrupt
    monkeypatch.setattr(glance.Cloud, "create_image", create)
    with pytest.raises(KeyboardInterrupt):
        glance.upload_image(default_lab, ws, image=str(f), name="lf-gap", cloud="lab")
    monkeypatch.undo()
    conn = admin_api(services)
    assert images_by_name(conn, "lf-gap") == []
    assert stuck_images(conn) == []


def test_hash_mismatch_deletes_image(clouds, services, ws, default_lab, tmp_path, monkeypatch):
    """Glance storing other bytes than the file's (simulated by changing the
    bytes between hashing and sending): the image is deleted, one error that
    says so.  The corruption is fault injection into labforge's own
    HashingBody (Glance and Keystone are real): acceptable, since nothing
    outside the client can make Glance store other bytes than it was sent."""
    img_path = make_qcow2(tmp_path / "mismatch.qcow2", data_mib=2, random=True)
    real_iter = glance.HashingBody.__iter__

    def corrupt(self):
        for i, chunk in enumerate(real_iter(self)):
            yield (b"\0" * len(chunk)) if i == 1 else chunk  # the qcow2 header stays intact
    monkeypatch.setattr(glance.HashingBody, "__iter__", corrupt)
    with pytest.raises(LabError, match="differs from the local") as err:
        glance.upload_image(default_lab, ws, image=str(img_path), name="lf-mismatch",
                            cloud="lab", method="direct")
    assert str(err.value).endswith("was deleted"), err.value
    assert str(err.value).count("deleted") == 1, err.value
    assert images_by_name(admin_api(services), "lf-mismatch") == []


def test_bad_input_one_line(clouds, cli, tmp_path):
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    proc = cli("glance-upload", "--image", str(tmp_path / "nope.qcow2"), "--cloud", "lab", env=env)
    assert_one_line_error(proc, "nope.qcow2")
    f = make_qcow2(tmp_path / "x.qcow2", data_mib=1, random=True)
    proc = cli("glance-upload", "--image", str(f), "--cloud", "no-such-cloud", env=env)
    assert_one_line_error(proc, "no-such-cloud")
    proc = cli("glance-upload", "--image", str(f), "--property", "novalue", "--cloud", "lab", env=env)
    assert_one_line_error(proc, "--property novalue", "KEY=VALUE")
    proc = cli("glance-upload", "--image", str(f), "--keep", "2", "--cloud", "lab", env=env)
    assert_one_line_error(proc, "--rotate-tag")
    proc = cli("publish-amphora", "--cloud", "lab", env=env)
    assert_one_line_error(proc, "invoke build-amphora")
    proc = cli("glance-upload", "--image", str(f), "--cloud", "lab", "--os-cacert",
               str(tmp_path / "no-ca.pem"), env=env)
    assert_one_line_error(proc, "--os-cacert", "no-ca.pem")
    # Keystone down / wrong auth_url: one line naming the URL, no library warnings beside it
    dead = {**dict(os.environ), "OS_CLIENT_CONFIG_FILE": str(tmp_path / "none.yaml"),
            "OS_AUTH_URL": "http://127.0.0.1:9/v3", "OS_USERNAME": "admin",
            "OS_PASSWORD": "pw-not-shown-7", "OS_PROJECT_NAME": "service",
            "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default"}
    dead.pop("OS_CLOUD", None)
    proc = cli("glance-upload", "--image", str(f), env=dead)
    assert_one_line_error(proc, "cannot reach Keystone at http://127.0.0.1:9/v3")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pw-not-shown-7" not in proc.stderr
