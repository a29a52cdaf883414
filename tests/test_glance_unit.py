"""Fast checks of the Glance publisher's local parts (no services)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tracemalloc

import pytest

from builders.publishers import glance
from builders.core import lab as labmod
from builders.core.errors import LabError
from builders.core.manifest import Manifest, input_digest


@pytest.mark.integration
def test_disk_format_detection(tmp_path):
    q = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(q), "16M"], check=True,
                   capture_output=True)
    assert glance.detect_disk_format(q) == "qcow2"
    r = tmp_path / "a.img"
    r.write_bytes(os.urandom(4096))
    assert glance.detect_disk_format(r) == "raw"
    v = tmp_path / "a.vmdk"
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(v), "16M"], check=True,
                   capture_output=True)
    assert glance.detect_disk_format(v) == "vmdk"
    iso = tmp_path / "a.iso"
    with open(iso, "wb") as fh:
        fh.truncate(0x9000)
        fh.seek(0x8001)
        fh.write(b"CD001")
    assert glance.detect_disk_format(iso) == "iso"


def test_hashing_body_one_pass_constant_memory(tmp_path):
    """Streaming a 512 MiB file allocates a few chunks at a time, not the file.
    tracemalloc counts what Python allocates from here on, in every thread
    (the reader thread's chunks too): a peak of its own, unlike the
    process's all-time ru_maxrss, which earlier tests may have raised."""
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:              # 512 MiB, mostly sparse
        fh.truncate(512 << 20)
        fh.write(os.urandom(3 << 20))
    size = f.stat().st_size
    body = glance.HashingBody(f, size, ["sha512"])
    assert len(body) == size
    tracemalloc.start()
    try:
        n = 0
        for chunk in body:
            n += len(chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == size and body.complete
    h = hashlib.sha512()
    with open(f, "rb") as fh:
        while c := fh.read(1 << 20):
            h.update(c)
    assert body.hexdigest("sha512") == h.hexdigest()
    # the queue's BUFFERS chunks, one being read, one being sent: ~6 MiB
    assert peak < (glance.BUFFERS + 4) * glance.CHUNK, peak / 2**20


def test_hashing_body_stops_when_abandoned(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(12 << 20))
    body = glance.HashingBody(f, f.stat().st_size, ["sha512"])
    it = iter(body)
    next(it)
    it.close()                             # the sender gave up (connection lost)
    assert not body.complete
    assert body._thread is not None and not body._thread.is_alive()


def test_properties_parsing():
    assert glance.parse_properties(["a=b", "c=d=e", "x="]) == {"a": "b", "c": "d=e", "x": ""}
    with pytest.raises(LabError, match="KEY=VALUE"):
        glance.parse_properties(["novalue"])


def test_amphora_properties_follow_lab(default_lab, tmp_path):
    props = glance.amphora_properties(default_lab)
    assert props == {"hw_architecture": "x86_64", "hw_rng_model": "virtio",
                     "os_distro": "debian", "os_version": "12"}
    raw = dict(default_lab.raw)
    raw["octavia"] = {"amphora": {"base_os": "ubuntu", "release": "noble", "arch": "arm64"}}
    lab = labmod.from_dict(raw)
    assert glance.amphora_properties(lab) == {"hw_architecture": "aarch64", "hw_rng_model": "virtio",
                                              "os_distro": "ubuntu", "os_version": "24.04"}


def test_glance_keep_validated(default_lab):
    raw = dict(default_lab.raw, glance={"keep": 0})
    with pytest.raises(LabError, match="glance.keep"):
        labmod.from_dict(raw)


def test_find_amphora(default_lab, ws):
    with pytest.raises(LabError, match="invoke build-amphora"):
        glance.find_amphora(default_lab, ws)
    p = ws.artifact_dir("images") / "amphora-x64-haproxy.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\0" * 100)
    Manifest(ws.artifacts).record(p, "amphora", input_digest("x"))
    assert glance.find_amphora(default_lab, ws) == "images/amphora-x64-haproxy.qcow2"
    src = glance.resolve_image(ws, "amphora-x64-haproxy", ("amphora",))
    assert src.path == p and src.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_resolve_image_errors(ws, tmp_path):
    with pytest.raises(LabError, match="no artifact of that name"):
        glance.resolve_image(ws, "debian-12")
    with pytest.raises(LabError, match="not a regular file"):
        glance.resolve_image(ws, str(tmp_path))


def test_changed_artifact_is_refused(ws):
    p = ws.artifact_dir("images") / "debian-12.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\0" * 100)
    Manifest(ws.artifacts).record(p, "base-image", input_digest("x"))
    p.write_bytes(b"QFI\xfb" + b"\1" * 100)
    with pytest.raises(LabError, match="differs from its record"):
        glance.resolve_image(ws, "debian-12")
