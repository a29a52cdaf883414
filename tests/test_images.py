"""Base images (download source), overlays, the DIB runner and its
device-mapper stand-ins, boot-check plumbing.  Real qemu-img, a real HTTP
server on 127.0.0.1, real loop devices; the minutes-long DIB build and VM
boot are in test_images_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builders.artifacts import baseimage, overlays
from builders.tools import dib, distros, download, qemu_img, qemu_vm
from builders.core.errors import LabError
from builders.core.fsutil import sha256_file
from builders.core.manifest import Manifest
from helpers import assert_one_line_error, lab_file, lab_from, make_qcow2
from imagetools import publish_debian


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF", 0.05)


def _download_lab(tmp_path, url, release="12"):
    return lab_from(tmp_path, base_image={"source": "download", "distro": "debian",
                                          "release": release, "url": url})


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_download_verifies_and_records(tmp_path, ws, mirror):
    img, digest = publish_debian(mirror.root)
    lab = _download_lab(tmp_path, mirror.url)
    [out] = baseimage.build_base_image(lab, ws)
    target = ws.artifacts / "images" / "debian-12.qcow2"
    assert out.status == "built" and out.paths == [target]
    assert sha256_file(target) == sha256_file(img)
    rec = Manifest(ws.artifacts).get(target)
    assert rec["sha256"] == sha256_file(target)
    assert rec["meta"]["virtual_size"] == 1 << 30 and rec["meta"]["sha512"] == digest
    assert rec["meta"]["source"] == "download" and rec["kind"] == "base-image"
    assert not list((ws.cache / "downloads").rglob("*.part"))
    # unchanged inputs: no network at all
    n = len(mirror.requests)
    [again] = baseimage.build_base_image(lab, ws)
    assert again.status == "up to date" and len(mirror.requests) == n


@pytest.mark.integration
def test_base_image_declares_what_it_records(tmp_path, ws, mirror):
    """The builder's declared output is the file it writes and records;
    ready() (what `invoke all` asks of a left-out step) follows it."""
    publish_debian(mirror.root)
    lab = _download_lab(tmp_path, mirror.url, release="bookworm")
    [declared] = baseimage.BASE_IMAGE.outputs(lab, ws)
    assert declared.path == ws.artifacts / "images" / "debian-12.qcow2"
    assert "no record of debian-12.qcow2" in baseimage.BASE_IMAGE.ready(lab, ws)
    [out] = baseimage.build_base_image(lab, ws)
    assert out.paths == [declared.path] and out.step == declared.label
    rec = Manifest(ws.artifacts).get(declared.path)
    assert rec["kind"] == baseimage.BASE_IMAGE.kind and rec["input_digest"] == declared.digest()
    assert baseimage.BASE_IMAGE.ready(lab, ws) is None


@pytest.mark.integration
def test_dropped_connection_is_resumed_with_range(tmp_path, ws, mirror):
    img, _ = publish_debian(mirror.root, data_mib=3)
    mirror.drop_after = 1 << 20                  # the first transfer dies after 1 MiB
    lab = _download_lab(tmp_path, mirror.url)
    baseimage.build_base_image(lab, ws)
    target = ws.artifacts / "images" / "debian-12.qcow2"
    assert sha256_file(target) == sha256_file(img)
    image_requests = [r for r in mirror.requests if r[0].endswith(".qcow2")]
    assert image_requests[0][1] is None
    assert image_requests[1][1] == f"bytes={1 << 20}-"     # resumed, not restarted


@pytest.mark.integration
def test_part_file_from_an_interrupted_run_is_resumed(tmp_path, ws, mirror):
    img, digest = publish_debian(mirror.root, data_mib=2)
    dest = ws.cache_dir("downloads") / img.name
    part = download.part_path(dest, digest)
    part.write_bytes(img.read_bytes()[:500_000])   # what a killed run left
    download.download(mirror.url + img.name, dest, expected=digest, algo="sha512")
    assert sha256_file(dest) == sha256_file(img) and not part.exists()
    assert mirror.requests[-1][1] == "bytes=500000-"


@pytest.mark.integration
def test_part_of_a_replaced_image_is_not_resumed(tmp_path, ws, mirror):
    """The mirror published a new `latest` since the interrupted run: start over."""
    img, digest = publish_debian(mirror.root, data_mib=2)
    dest = ws.cache_dir("downloads") / img.name
    old = download.part_path(dest, "0" * 128)
    old.write_bytes(b"x" * 500_000)                 # a part of the previous image
    download.download(mirror.url + img.name, dest, expected=digest, algo="sha512")
    assert sha256_file(dest) == sha256_file(img) and not old.exists()
    assert [r[1] for r in mirror.requests if r[0].endswith(img.name)] == [None]


@pytest.mark.integration
def test_server_without_range_support_starts_over(tmp_path, ws, mirror):
    img, digest = publish_debian(mirror.root, data_mib=2)
    mirror.ranges = False
    mirror.drop_after = 700_000
    dest = ws.cache_dir("downloads") / img.name
    download.download(mirror.url + img.name, dest, expected=digest, algo="sha512",
                       backoff=0.05)
    assert sha256_file(dest) == sha256_file(img)


@pytest.mark.integration
def test_wrong_checksum_is_rejected_and_nothing_is_left(tmp_path, ws, mirror, cli):
    publish_debian(mirror.root, wrong_sum=True)
    lab = lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})
    proc = cli("base-image", "--lab", str(lab))
    # download progress lines come first; then exactly one error line, last
    line = assert_one_line_error(proc, "sha512 checksum mismatch", "deleted", where="any")
    assert proc.stderr.rstrip().splitlines()[-1] == line
    assert not (ws.artifacts / "images" / "debian-12.qcow2").exists()
    leftovers = [p for p in ws.root.rglob("*") if p.is_file() and p.suffix in (".part", ".qcow2")]
    assert leftovers == []


def test_unknown_release_is_one_line(tmp_path, cli):
    lab = lab_file(tmp_path, base_image={"source": "download", "release": "7"})
    assert_one_line_error(cli("base-image", "--lab", str(lab)),
                          "base_image.release: '7' is not a known debian release", "12 (bookworm)")


def test_unreachable_mirror_is_one_line(tmp_path, cli):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                    # nothing listens there now
    lab = lab_file(tmp_path, base_image={"source": "download",
                                         "url": f"http://127.0.0.1:{port}/debian/"})
    proc = cli("base-image", "--lab", str(lab))
    assert_one_line_error(proc, f"127.0.0.1:{port}", "connection refused", "base_image.url")


def test_release_names_and_upstream_urls():
    rel = distros.Release("debian", "12", "bookworm")
    assert baseimage.remote_names(rel) == ("debian-12-genericcloud-amd64.qcow2", "SHA512SUMS", "sha512")
    u = distros.Release("ubuntu", "24.04", "noble")
    assert baseimage.remote_names(u) == ("noble-server-cloudimg-amd64.img", "SHA256SUMS", "sha256")


def test_release_accepts_codename(tmp_path):
    lab = lab_from(tmp_path, base_image={"distro": "ubuntu", "release": "noble"})
    assert baseimage.release(lab).name == "ubuntu-24.04"
    assert baseimage._base_url(lab, baseimage.release(lab)) == \
        "https://cloud-images.ubuntu.com/noble/current/"


# --------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------
def _base(ws, name="debian-12", size="1G", fmt="qcow2"):
    path = ws.artifacts / "images" / f"{name}.qcow2"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "qcow2":
        make_qcow2(path, size)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def _info(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.integration
def test_overlays_for_the_default_lab(ws, default_lab):
    base = _base(ws)
    outs = overlays.build_overlays(default_lab, ws)
    assert [o.status for o in outs] == ["built"] * 3
    for h in default_lab.hosts:
        ov = ws.artifacts / "vms" / f"{h.name}.qcow2"
        chain = _info(ov)
        assert chain[0]["format"] == "qcow2" and chain[0]["virtual-size"] == h.disk << 30
        assert chain[0]["backing-filename"] == "../images/debian-12.qcow2"
        assert chain[0]["backing-filename-format"] == "qcow2"
        assert Path(chain[1]["filename"]).resolve() == base.resolve()
        rec = Manifest(ws.artifacts).get(ov)
        assert rec["kind"] == "overlay" and rec["meta"]["backing_sha256"] == sha256_file(base)
    assert [o.status for o in overlays.build_overlays(default_lab, ws)] == ["up to date"] * 3


@pytest.mark.integration
def test_changing_one_host_rebuilds_only_its_overlay(tmp_path, ws):
    _base(ws)
    lab = lab_from(tmp_path)
    overlays.build_overlays(lab, ws)
    lab2 = lab_from(tmp_path, filename="lab2.yaml", **{"hosts.broker2.disk": 30})
    assert [(o.step, o.status) for o in overlays.build_overlays(lab2, ws)] == [
        ("overlay broker1", "up to date"), ("overlay broker2", "built"),
        ("overlay broker3", "up to date")]
    assert _info(ws.artifacts / "vms" / "broker2.qcow2")[0]["virtual-size"] == 30 << 30


@pytest.mark.integration
def test_new_base_invalidates_overlays(ws, default_lab):
    base = _base(ws)
    overlays.build_overlays(default_lab, ws)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(base)],
                   check=True, capture_output=True)
    assert {o.status for o in overlays.build_overlays(default_lab, ws)} == {"built"}


@pytest.mark.integration
def test_overlay_a_vm_wrote_to_is_kept_unless_forced(ws, default_lab):
    base = _base(ws)
    overlays.build_overlays(default_lab, ws, hosts=["broker1"])
    ov = ws.artifacts / "vms" / "broker1.qcow2"
    # the VM writes 1 MiB
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", str(ov)],
                   check=True, capture_output=True)
    [same] = overlays.build_overlays(default_lab, ws, hosts=["broker1"])
    assert same.status == "up to date" and "written" in same.detail
    # a new base would discard the VM's data: refused
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(base)],
                   check=True, capture_output=True)
    with pytest.raises(LabError, match="a VM has written 1 MiB.*--force"):
        overlays.build_overlays(default_lab, ws, hosts=["broker1"])
    assert qemu_img.written_bytes(ov) == 1 << 20
    [forced] = overlays.build_overlays(default_lab, ws, hosts=["broker1"], force=True)
    assert forced.status == "built" and qemu_img.written_bytes(ov) == 0


@pytest.mark.integration
def test_overlay_creation_does_not_copy_the_base(ws, default_lab):
    _base(ws, size="10G")
    make_qcow2(ws.artifacts / "images" / "debian-12.qcow2", "10G", data_mib=8)
    overlays.build_overlays(default_lab, ws, hosts=["broker1"])
    assert (ws.artifacts / "vms" / "broker1.qcow2").stat().st_size < 1 << 20


@pytest.mark.integration
def test_base_not_qcow2_is_one_line(ws, cli):
    _base(ws, fmt="raw")
    assert_one_line_error(cli("overlays"), "debian-12.qcow2 is raw, not qcow2", "qemu-img convert")
    assert not (ws.artifacts / "vms").exists() or not list((ws.artifacts / "vms").iterdir())


@pytest.mark.integration
def test_disk_smaller_than_base_is_one_line(ws, cli):
    _base(ws, size="25G")
    assert_one_line_error(cli("overlays"), "hosts.broker1.disk: 20 GiB is smaller than the base "
                          "image debian-12.qcow2 (25.0 GiB)", "at least 25")
    assert not (ws.artifacts / "vms").exists() or not list((ws.artifacts / "vms").iterdir())


def test_missing_base_is_one_line(cli):
    assert_one_line_error(cli("overlays"), "debian-12.qcow2 does not exist", "invoke base-image")


# --------------------------------------------------------------------------
# diskimage-builder runner and the device-mapper stand-ins
# --------------------------------------------------------------------------
def test_mirrors_come_from_apt_sources(tmp_path):
    root = tmp_path / "root"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    lab = lab_from(tmp_path)
    assert distros.debian_mirrors(lab, root) == ("http://mirror.example/debian",
                                             "http://mirror.example/debian-security")
    (root / "etc/apt/sources.list.d/debian.sources").unlink()
    (root / "etc/apt/sources.list").write_text("deb [arch=amd64] http://m.example/debian bookworm main\n")
    assert distros.debian_mirrors(lab, root) == ("http://m.example/debian",
                                             "http://m.example/debian-security")
    lab = lab_from(tmp_path, build={"debian_mirror": "http://x/debian",
                                    "debian_security_mirror": "http://y/sec"})
    assert distros.debian_mirrors(lab, root) == ("http://x/debian", "http://y/sec")


def test_dib_env_has_what_debian_minimal_needs(tmp_path, ws):
    lab = lab_from(tmp_path)
    env = dib.dib_env(lab, ws, ["debian-minimal", "cloud-init-datasources"])
    assert env["DIB_DEBIAN_SECURITY_MIRROR"].endswith("-security")
    assert env["DIB_CLOUD_INIT_DATASOURCES"] == "NoCloud, ConfigDrive, OpenStack"
    assert env["DIB_IMAGE_CACHE"].startswith(str(ws.cache))
    assert env["REQUESTS_CA_BUNDLE"] == "/etc/ssl/certs/ca-certificates.crt"


def test_dib_failure_names_the_script():
    log = ["2026 | dib-run-parts Running /tmp/in_target.d/install.d/01-package-installs",
           "2026 | dib-run-parts 01-package-installs completed",
           "2026 | dib-run-parts Running /tmp/in_target.d/install.d/50-cloud-init",
           "E: Unable to locate package nope"]
    assert dib.failing_script(log) == "install.d/50-cloud-init"
    assert dib.failing_script(log[:2]) is None


@pytest.mark.integration
def test_dib_failure_is_one_line_with_the_log(tmp_path, ws):
    lab = lab_from(tmp_path)
    out = ws.artifacts / "images" / "x.qcow2"
    with pytest.raises(LabError) as err:
        dib.disk_image_create(lab, ws, name="bad", elements=["no-such-element"], output=out)
    assert "artifacts/logs/bad.log" in str(err.value) or "bad.log" in str(err.value)
    assert (ws.artifacts / "logs" / "bad.log").exists()
    assert not out.exists() and list((ws.artifacts / "images").iterdir()) == []


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_kpartx_dmsetup_standins_map_loop_partitions(tmp_path):
    """The stand-ins do what DIB asks of kpartx/dmsetup, with partx."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.truncate(48 << 20)
    subprocess.run(["sgdisk", str(img), "-n", "1:0:+16M", "-t", "1:8300", "-n", "2:0:+16M",
                    "-t", "2:8300"], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "--show", "-f", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    name = loop.removeprefix("/dev/")
    env = dict(os.environ, PATH=f"{dib.STANDIN_DIR}:{os.environ['PATH']}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run(["sudo", "kpartx", "-uvs", loop], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert f"add map {name}p1" in out and f"add map {name}p2" in out
        p1 = Path(f"/dev/mapper/{name}p1")
        assert p1.is_block_device()
        subprocess.run(["mkfs.ext4", "-q", str(p1)], check=True)
        subprocess.run(["mount", str(p1), str(mnt)], check=True)
        (mnt / "hello").write_text("hi")
        subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["dmsetup", "--noudevsync", "mknodes"], env=env, check=True)
        subprocess.run(["dmsetup", "remove", f"{name}p2"], env=env, check=True)
        assert not Path(f"/dev/mapper/{name}p2").exists()
        subprocess.run(["kpartx", "-d", loop], env=env, check=True)
        assert not p1.exists() and not Path(f"/sys/block/{name}/{name}p1").exists()
        bad = subprocess.run(["dmsetup", "create", "x"], env=env, capture_output=True, text=True)
        assert bad.returncode != 0 and "not supported" in bad.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run([str(dib.STANDIN_DIR / "kpartx"), "-d", loop], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


# --------------------------------------------------------------------------
# boot-check plumbing (the boot itself is in test_images_e2e.py)
# --------------------------------------------------------------------------
def test_accel_plan_puts_tcg_behind_a_detected_kvm(monkeypatch):
    """A probed KVM may still stall once the guest kernel starts (nested hosts):
    a boot then starts over under TCG, and later boots go straight to TCG."""
    monkeypatch.delenv("LABFORGE_ACCEL", raising=False)
    monkeypatch.setattr(qemu_vm, "_kvm_stall", [])
    monkeypatch.setattr(qemu_vm, "_probe_kvm", lambda: "kvm")
    assert qemu_vm.accel_plan() == ["kvm", "tcg"]
    assert qemu_vm.accel_plan("kvm") == ["kvm"]             # asked for: no fallback
    with pytest.raises(LabError, match="'xen' is not kvm or tcg"):
        qemu_vm.accel_plan("xen")
    monkeypatch.setenv("LABFORGE_ACCEL", "kvm")
    assert qemu_vm.accel_plan() == ["kvm"]
    monkeypatch.delenv("LABFORGE_ACCEL")
    qemu_vm.kvm_stalled("boot-check broker1")
    assert qemu_vm.detect_accel() == "tcg" and qemu_vm.accel_plan() == ["tcg"]
    monkeypatch.setattr(qemu_vm, "_probe_kvm", lambda: "tcg")
    monkeypatch.setattr(qemu_vm, "_kvm_stall", [])
    assert qemu_vm.accel_plan() == ["tcg"]


def test_a_pvm_kvm_counts_as_no_kvm(tmp_path):
    """KVM's PVM backend (no VT-x/AMD-V) runs SeaBIOS but not a stock guest
    kernel: Vagrantfiles and boots made there use TCG."""
    mods = tmp_path / "module"
    (mods / "kvm").mkdir(parents=True)
    assert not qemu_vm._kvm_is_pvm(mods)
    (mods / "kvm_pvm").mkdir()
    assert qemu_vm._kvm_is_pvm(mods)
    (mods / "kvm_intel").mkdir()
    assert not qemu_vm._kvm_is_pvm(mods)


def test_a_kvm_stall_is_remembered_in_the_workspace(monkeypatch, ws):
    """The next process on this host (same kernel and QEMU) skips the 45 s KVM try."""
    monkeypatch.delenv("LABFORGE_ACCEL", raising=False)
    monkeypatch.setattr(qemu_vm, "_probe_kvm", lambda: "kvm")
    monkeypatch.setattr(qemu_vm, "_kvm_stall", [])
    qemu_vm.kvm_stalled("boot-check broker1", ws)
    monkeypatch.setattr(qemu_vm, "_kvm_stall", [])        # a new process
    assert qemu_vm.accel_plan(None, ws) == ["tcg"]
    assert qemu_vm.accel_plan(None, None) == ["kvm", "tcg"]  # another workspace tries KVM
    (ws.cache / qemu_vm.STALL_MEMO).write_text("5.10.0-other /usr/bin/qemu 7.2\n")
    assert qemu_vm.accel_plan(None, ws) == ["kvm", "tcg"]  # another kernel: try again


def _blank_vm(tmp_path, **over):
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    return qemu_vm.VmSpec(name="labforge-test", drives=(qemu_vm.Drive(disk, throwaway=True),),
                          memory=64, **over)


def test_vm_argv_has_every_nic_with_its_own_netdev(tmp_path):
    spec = qemu_vm.VmSpec(
        name="t", drives=(qemu_vm.Drive(tmp_path / "d.qcow2"),
                          qemu_vm.Drive(tmp_path / "seed.iso", "raw", cdrom=True)),
        nics=(qemu_vm.Nic.user(mac="52:54:00:00:00:01", forwards=[("tcp", 8443, 9443)]),
              qemu_vm.Nic.user(options=["net=10.0.3.0/24"], forwards=[("udp", 5555, 5555)])),
        cpus=2, cpus_tcg=1)
    argv = qemu_vm.qemu_argv(spec, "tcg", tmp_path / "console.log", tmp_path / "pid")
    assert argv[argv.index("-smp") + 1] == "1" and "-cpu" not in argv
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == ["user,id=n0,hostfwd=tcp:127.0.0.1:8443-:9443",
                       "user,id=n1,net=10.0.3.0/24,hostfwd=udp:127.0.0.1:5555-:5555"]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices == ["virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01", "virtio-net-pci,netdev=n1"]
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert "if=ide" in drives[1] and "media=cdrom" in drives[1] and "readonly=on" in drives[1]
    kvm = qemu_vm.qemu_argv(spec, "kvm", tmp_path / "console.log", tmp_path / "pid")
    assert kvm[kvm.index("-smp") + 1] == "2" and kvm[kvm.index("-cpu") + 1] == "host"


@pytest.mark.integration
def test_vm_runner_forwards_ports_and_always_stops_qemu(tmp_path, ws):
    """A real QEMU (a disk with nothing to boot: SeaBIOS waits forever): the
    forwarded port answers while it runs; a probe that raises (Ctrl-C here)
    or a timeout stops it, and its work directory goes with it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _blank_vm(tmp_path, nics=(qemu_vm.Nic.user(forwards=[("tcp", port, 22)]),))
    vms, answered = [], []

    def probe(vm):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                answered.append(True)      # QEMU's forwarder accepts: the NIC is set up
        except ConnectionRefusedError:
            return None                    # QEMU is still starting
        raise KeyboardInterrupt

    watch = qemu_vm.Watch(probe, on_start=vms.append)
    with pytest.raises(KeyboardInterrupt):
        qemu_vm.boot(spec, watch, what="vm-test", console=tmp_path / "console.log",
                     timeout=300, accel="tcg", ws=ws, workdir=tmp_path)
    assert answered and vms[0].returncode is not None        # stopped, not left running
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    watch = qemu_vm.Watch(lambda vm: None, waiting_for="the marker appeared", on_start=vms.append)
    with pytest.raises(LabError) as err:
        qemu_vm.boot(spec, watch, what="vm-test", console=tmp_path / "console.log",
                     timeout=2, accel="tcg", ws=ws, workdir=tmp_path)
    assert "vm-test: the marker appeared did not happen within 2s (tcg)" in str(err.value)
    assert vms[1].returncode is not None


@pytest.mark.integration
def test_vm_that_exits_is_one_line_with_its_status(tmp_path, ws):
    spec = _blank_vm(tmp_path, extra=("-boot", "reboot-timeout=0"))   # SeaBIOS gives up: exit
    watch = qemu_vm.Watch(lambda vm: None, waiting_for="the marker appeared")
    with pytest.raises(LabError, match=r"vm-test: qemu exited \(status 0\) before the marker "
                                       "appeared; console: "):
        qemu_vm.boot(spec, watch, what="vm-test", console=tmp_path / "console.log",
                     timeout=120, accel="tcg", ws=ws, workdir=tmp_path)


def test_boot_check_without_overlay_is_one_line(cli):
    assert_one_line_error(cli("boot-check", "--host", "broker1"), "broker1.qcow2",
                          "invoke overlays")


def test_boot_check_unknown_host_is_one_line(cli):
    assert_one_line_error(cli("boot-check", "--host", "nope"), "no host named 'nope'")


# --------------------------------------------------------------------------
# libvirt XML (virsh users)
# --------------------------------------------------------------------------
@pytest.mark.integration
def test_libvirt_xml_is_valid_and_points_at_the_artifacts(ws, default_lab):
    import xml.etree.ElementTree as ET
    from builders.artifacts import seed as seeds
    from builders.artifacts.libvirtxml import build_libvirt_xml
    outs = build_libvirt_xml(default_lab, ws, accel="tcg")    # validated by virt-xml-validate
    assert {o.status for o in outs} == {"built"} and len(outs) == 2 + 2 * 3   # 2 networks
    d = ET.parse(ws.artifacts / "libvirt" / "broker1.xml").getroot()
    assert d.get("type") == "qemu" and d.findtext("name") == "kafka-lab-broker1"
    assert d.find("devices/disk[@device='disk']/source").get("file") == \
        str((ws.artifacts / "vms" / "broker1.qcow2").resolve())
    assert d.find("devices/disk[@device='disk']/driver").get("type") == "qcow2"
    assert d.find("devices/disk[@device='cdrom']/source").get("file") == \
        str(seeds.seed_path(default_lab, ws, "broker1").resolve())
    nics = [(n.find("source").get("network"), n.find("mac").get("address"))
            for n in d.findall("devices/interface")]               # every NIC, in lab order
    assert nics == [("public", "52:54:00:10:00:0b"), ("private", "52:54:00:64:00:0b")]
    v = ET.parse(ws.artifacts / "libvirt" / "broker1-volume.xml").getroot()
    assert v.findtext("backingStore/path").endswith("images/debian-12.qcow2")
    assert v.find("backingStore/format").get("type") == "qcow2"
    assert v.findtext("capacity") == "20" and v.find("capacity").get("unit") == "GiB"
    n = ET.parse(ws.artifacts / "libvirt" / "net-private.xml").getroot()
    assert n.find("ip").get("address") == "10.100.0.1" and n.find("ip").get("netmask") == "255.255.255.0"
    assert {o.status for o in build_libvirt_xml(default_lab, ws, accel="tcg")} == {"up to date"}


@pytest.mark.integration
def test_ubuntu_checksum_file_signature_is_checked_with_gpgv(tmp_path, ws, mirror, monkeypatch):
    """SHA256SUMS.gpg is verified with gpgv against the cloud image keyring
    (here a throwaway key stands in for Ubuntu's)."""
    import hashlib
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(gnupg), "--pinentry-mode", "loopback",
           "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "labforge test <t@example.invalid>", "ed25519",
                    "sign", "1d"], check=True, capture_output=True)
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(subprocess.run([*gpg, "--export"], check=True,
                                       capture_output=True).stdout)
    import dataclasses
    monkeypatch.setitem(distros.DISTROS, "ubuntu",
                        dataclasses.replace(distros.UBUNTU, keyrings=(str(keyring),)))
    name = "noble-server-cloudimg-amd64.img"
    img = make_qcow2(mirror.root / name, "1G", 1)
    sums = mirror.root / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(img.read_bytes()).hexdigest()} *{name}\n")
    subprocess.run([*gpg, "--detach-sign", "-o", str(mirror.root / "SHA256SUMS.gpg"), str(sums)],
                   check=True, capture_output=True)
    lab = lab_from(tmp_path, base_image={"source": "download", "distro": "ubuntu",
                                         "release": "24.04", "url": mirror.url})
    [out] = baseimage.build_base_image(lab, ws)
    rec = Manifest(ws.artifacts).get(ws.artifacts / "images" / "ubuntu-24.04.qcow2")
    assert out.status == "built" and rec["meta"]["signature"] == "good"
    # a checksum file changed after signing is refused before any image download
    sums.write_text(sums.read_text().replace(name, name + " "))
    with pytest.raises(LabError, match="verifying SHA256SUMS.*gpgv.*failed"):
        baseimage.build_base_image(lab, ws, force=True)


# --------------------------------------------------------------------------
# the DIB package layer (mmdebstrap --include, cached by DIB)
# --------------------------------------------------------------------------
def test_package_layer_is_keyed_by_mirror_and_adds_updates_and_security(tmp_path, ws):
    mirrors = {"debian_mirror": "http://mirror.example/debian",
               "debian_security_mirror": "http://mirror.example/debian-security"}
    lab = lab_from(tmp_path, build=mirrors)
    rel = baseimage.release(lab)
    env = baseimage._package_layer(lab, ws, rel)
    cache = Path(env["DIB_IMAGE_CACHE"])
    assert cache.parent == ws.cache / "dib" / "layers" and cache.name.startswith("bookworm-")
    # DIB runs `sh -c "mmdebstrap ... $DIB_MMDEBSTRAP_EXTRA_ARGS ..."`: parse it the same way
    # and run the setup hook against a fake root, as mmdebstrap would
    root = tmp_path / "root"
    (root / "etc" / "apt").mkdir(parents=True)
    args = subprocess.run(["sh", "-c", 'for a in ' + env["DIB_MMDEBSTRAP_EXTRA_ARGS"] +
                           '; do printf "%s\\0" "$a"; done'],
                          capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    include = next(a for a in args if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert "linux-image-amd64" in include and "cloud-init" in include
    assert not any(p.startswith("grub") for p in include)        # the bootloader is DIB's, on the disk
    hook = next(a for a in args if a.startswith("--setup-hook=")).split("=", 1)[1]
    subprocess.run(["sh", "-c", hook, "sh", str(root)], check=True)
    assert (root / "etc/apt/sources.list").read_text().splitlines() == [
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main"]
    # another mirror is another layer
    other = lab_from(tmp_path, filename="b.yaml",
                     build={**mirrors, "debian_mirror": "http://other.example/debian"})
    assert baseimage._package_layer(other, ws, rel)["DIB_IMAGE_CACHE"] != env["DIB_IMAGE_CACHE"]


def test_what_a_change_rebuilds_the_layer_or_only_the_image(tmp_path, ws, monkeypatch):
    """The package layer holds the packages; the elements and the disk run on
    top of it. Another package list is another layer and another image; another
    element or disk size rebuilds the image from the same layer."""
    lab = lab_from(tmp_path)
    rel = baseimage.release(lab)

    def keys(lab):
        layer = baseimage._package_layer(lab, ws, rel, on_host=False)["DIB_IMAGE_CACHE"]
        return layer, baseimage.build_digest(lab, rel, "3.39.0")

    layer, image = keys(lab)
    more = keys(lab_from(tmp_path, filename="p.yaml",
                         base_image={"packages": [*lab.base_image.packages, "jq"]}))
    assert more[0] != layer and more[1] != image
    bigger = keys(lab_from(tmp_path, filename="s.yaml", base_image={"size": lab.base_image.size + 2}))
    assert bigger[0] == layer and bigger[1] != image
    monkeypatch.setattr(baseimage, "BUILD_ELEMENTS", (*baseimage.BUILD_ELEMENTS, "devuser"))
    elements = keys(lab)
    assert elements[0] == layer and elements[1] != image
    assert keys(lab_from(tmp_path, filename="same.yaml")) == elements     # same inputs, same keys


@pytest.mark.integration
def test_release_codename_with_skip_base_image_finds_the_base_image(tmp_path, ws, mirror, cli):
    """`release: bookworm` names the image debian-12.qcow2; a run that leaves the
    base image step out must find that file, not look for debian-bookworm."""
    publish_debian(mirror.root, data_mib=1)
    lab = lab_file(tmp_path, base_image={"source": "download", "release": "bookworm",
                                         "url": mirror.url})
    proc = cli("base-image", "--lab", str(lab))
    assert proc.returncode == 0, proc.stderr
    assert (ws.artifacts / "images" / "debian-12.qcow2").is_file()
    skip = [a for k in ("certs", "seed-iso", "base-image", "amphora", "vagrant", "glance")
            for a in ("--skip", k)]
    proc = cli("all", "--lab", str(lab), "--json", *skip)
    doc = json.loads(proc.stdout)
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["overlays"]["status"] == "built", steps["overlays"]
