"""Vagrant boxes, the box catalog, the lab's Vagrantfile and libvirt networks.

Images are real qcow2 files made with qemu-img; boxes are checked by reading
them back and by the real Vagrant 2.3.4 + vagrant-libvirt from Debian, with
a temporary VAGRANT_HOME; network XML by libvirt itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from builders.core import lab as labmod
from builders.artifacts import vagrant
from builders.core.errors import LabError
from builders.core.fsutil import sha256_file
from builders.core.manifest import Manifest
from builders.tools import libvirt
from helpers import assert_one_line_error, lab_file, sh, write_lab

pytestmark = pytest.mark.integration  # qemu-img everywhere; vagrant/virsh where named


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """base.qcow2 (1.5 GiB virtual, 8 MiB of random data), over.qcow2 (backed
    by base, 2 MiB of 0xab written over it) and a raw disk."""
    d = tmp_path_factory.mktemp("images")
    raw = d / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", raw, "1536M")
    with open(raw, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(os.urandom(8 << 20))
        fh.seek(512 << 20)
        fh.write(b"labforge" * 4096)
    base = d / "base.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", raw, base)
    over = d / "over.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", over)
    sh("qemu-io", "-c", "write -P 0xab 100M 2M", over)
    other = d / "other.qcow2"                     # a second, different image
    sh("qemu-img", "create", "-q", "-f", "qcow2", other, "1G")
    sh("qemu-io", "-c", "write -P 0x5a 0 1M", other)
    return {"raw": raw, "base": base, "over": over, "other": other}


def record_image(ws, src: Path, name: str, kind: str) -> Path:
    dest = ws.artifact_dir("images") / name
    shutil.copyfile(src, dest)
    Manifest(ws.artifacts).record(dest, kind, "test-input", meta={"arch": "x86_64"})
    return dest


@pytest.fixture
def built(ws, images):
    """A workspace whose manifest holds a base image and an amphora."""
    return {"debian": record_image(ws, images["base"], "debian-12.qcow2", "base-image"),
            "amphora": record_image(ws, images["other"], "amphora-x64-haproxy.qcow2", "amphora")}


def read_box(box: Path, tmp: Path) -> tuple[list[str], dict, str, Path]:
    out = tmp / f"x-{box.stem}"
    out.mkdir()
    with tarfile.open(box, "r:") as tf:    # plain tar: tarfile must read it uncompressed
        names = tf.getnames()
        for m in tf.getmembers():           # regular files with plain names only
            assert m.isreg() and "/" not in m.name and m.uid == 0 and m.mode == 0o644, m
            with tf.extractfile(m) as src, open(out / m.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 4 << 20)
    return names, json.loads((out / "metadata.json").read_text()), \
        (out / "Vagrantfile").read_text(), out / "box.img"


def img_info(path: Path) -> dict:
    return json.loads(sh("qemu-img", "info", "--output=json", path).stdout)


# --------------------------------------------------------------------------
# boxes and the catalog
# --------------------------------------------------------------------------
def test_box_from_backed_image_is_flattened(ws, images, tmp_path):
    o, _ = vagrant.build_box(None, ws, image=str(images["over"]), name="test/lab", version="1.0.0")
    box = ws.artifacts / "boxes" / "test-lab-1.0.0.box"
    assert o.status == "built" and box in o.paths and "flattened" in o.detail
    names, meta, vfile, img = read_box(box, tmp_path)
    assert names == ["metadata.json", "Vagrantfile", "box.img"]
    assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": 2}  # 1.5 GiB -> 2
    assert 'libvirt.driver = "kvm"' in vfile and 'libvirt.disk_bus = "virtio"' in vfile
    info = img_info(img)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    # same guest-visible content as the overlay on its base
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", images["over"], img)
    rec = Manifest(ws.artifacts).get(box)
    assert rec["kind"] == "vagrant-box" and rec["sha256"] == sha256_file(box)
    assert rec["meta"]["flattened"] is True and rec["meta"]["version"] == "1.0.0"
    # no temporary files left next to the box
    assert sorted(p.name for p in box.parent.iterdir()) == ["test-lab-1.0.0.box", "test-lab.json"]


def test_unbacked_image_is_packed_as_is_and_catalog_matches(ws, built, tmp_path):
    o, _ = vagrant.build_box(None, ws, image="debian-12", name="labforge/debian-12")
    assert o.status == "built" and "flattened" not in o.detail
    box = ws.artifacts / "boxes" / "labforge-debian-12-1.0.0.box"
    names, meta, _, img = read_box(box, tmp_path)
    assert sha256_file(img) == sha256_file(built["debian"])      # the file as is
    cat = json.loads((ws.artifacts / "boxes" / "labforge-debian-12.json").read_text())
    assert cat["name"] == "labforge/debian-12"
    [v] = cat["versions"]
    [p] = v["providers"]
    assert v["version"] == "1.0.0"
    assert p == {"name": "libvirt", "url": box.resolve().as_uri(), "checksum_type": "sha256",
                 "checksum": sha256_file(box), "architecture": "amd64",
                 "default_architecture": True}
    assert Manifest(ws.artifacts).get(ws.artifacts / "boxes" / "labforge-debian-12.json")["kind"] \
        == "vagrant-catalog"


def test_versions_up_to_date_bump_and_catalog_update(ws, built, images):
    o1, _ = vagrant.build_box(None, ws, image="debian-12", name="t/b")
    box1 = ws.artifacts / "boxes" / "t-b-1.0.0.box"
    sha1 = sha256_file(box1)
    o2, _ = vagrant.build_box(None, ws, image="debian-12", name="t/b")
    assert (o1.status, o2.status) == ("built", "up to date")
    assert "1.0.0" in o2.step
    # a changed image gets the next version; the first stays in the catalog
    sh("qemu-io", "-c", "write -P 0x11 0 64k", built["debian"])
    o3, _ = vagrant.build_box(None, ws, image="debian-12", name="t/b")
    assert o3.status == "built" and "1.0.1" in o3.step
    o4, _ = vagrant.build_box(None, ws, image="amphora-x64-haproxy", name="t/b", version="1.10.0")
    assert o4.status == "built"
    cat = json.loads((ws.artifacts / "boxes" / "t-b.json").read_text())
    assert [v["version"] for v in cat["versions"]] == ["1.0.0", "1.0.1", "1.10.0"]
    assert cat["versions"][0]["providers"][0]["checksum"] == sha1 == sha256_file(box1)
    for v in cat["versions"]:
        box = ws.artifacts / "boxes" / f"t-b-{v['version']}.box"
        assert v["providers"][0]["checksum"] == sha256_file(box)
    # force rebuilds the same version, identical bytes (reproducible tar)
    o5, _ = vagrant.build_box(None, ws, image="amphora-x64-haproxy", name="t/b", version="1.10.0",
                            force=True)
    assert o5.status == "built"
    assert cat == json.loads((ws.artifacts / "boxes" / "t-b.json").read_text())


def test_catalog_of_another_box_is_refused(ws, built):
    vagrant.build_box(None, ws, image="debian-12", name="a-b/c")
    with pytest.raises(LabError, match="is the catalog of box 'a-b/c'"):
        vagrant.build_box(None, ws, image="debian-12", name="a/b-c")


def test_base_url_publishes_http_urls(ws, built):
    o1, _ = vagrant.build_box(None, ws, image="debian-12", name="t/b")
    box = ws.artifacts / "boxes" / "t-b-1.0.0.box"
    stat = box.stat()
    # serving the same box elsewhere rewrites the catalog only, not the box
    o2, cat2 = vagrant.build_box(None, ws, image="debian-12", name="t/b",
                                 base_url="https://boxes.example/t/")
    assert o2.status == "up to date"
    assert cat2.status == "built" and cat2.paths == [ws.artifacts / "boxes" / "t-b.json"]
    assert "catalog URL now https://boxes.example/t/t-b-1.0.0.box" in cat2.detail
    assert box.stat().st_mtime_ns == stat.st_mtime_ns
    cat = json.loads((ws.artifacts / "boxes" / "t-b.json").read_text())
    assert [v["version"] for v in cat["versions"]] == ["1.0.0"]
    assert cat["versions"][0]["providers"][0]["url"] == "https://boxes.example/t/t-b-1.0.0.box"
    outcomes = vagrant.build_box(None, ws, image="debian-12", name="t/b",
                                 base_url="https://boxes.example/t/")
    assert [o.status for o in outcomes] == ["up to date", "up to date"]


@pytest.mark.parametrize("args, needle", [
    (("--image", "RAW"), "is a raw image, not qcow2"),
    (("--image", "TRUNC"), "`qemu-img check` finds the image damaged"),
    (("--image", "debian-13"), "debian-13: no base-image or amphora of that name"),
    (("--image", "/nonexistent/x.qcow2"), "--image /nonexistent/x.qcow2: no such image file"),
    (("--image", "debian-12", "--name", "no-slash"), "--name 'no-slash': not a box name like ORG/NAME"),
    (("--image", "debian-12", "--name", "a/b/../c"), "not a box name like ORG/NAME"),
    (("--image", "debian-12", "--version", "1.2"), "--version '1.2': not a box version like 1.2.3"),
    (("--image", "debian-12", "--version", "v1.2.3"), "not a box version like 1.2.3"),
])
def test_bad_input_one_line_nothing_written(cli, ws, built, images, args, needle):
    trunc = ws.root / "trunc.qcow2"                # a qcow2 cut short: header only
    trunc.write_bytes(images["base"].read_bytes()[:1000])
    args = tuple({"RAW": str(images["raw"]), "TRUNC": str(trunc)}.get(a, a) for a in args)
    before = json.loads(ws.manifest_path.read_text())
    proc = cli("vagrant-box", *args)
    assert_one_line_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (ws.artifacts / "boxes").exists()
    assert json.loads(ws.manifest_path.read_text()) == before


def test_cli_builds_box(cli, ws, built):
    proc = cli("vagrant-box", "--image", "debian-12", "--version", "2.0.0", check=True)
    assert proc.stdout.startswith("vagrant-box labforge/debian-12 2.0.0: built")
    assert (ws.artifacts / "boxes" / "labforge-debian-12-2.0.0.box").is_file()


# --------------------------------------------------------------------------
# the real Vagrant
# --------------------------------------------------------------------------
@pytest.fixture
def venv(tmp_path) -> dict:
    home = tmp_path / "vagrant-home"
    home.mkdir()
    return {"VAGRANT_HOME": str(home), "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1"}


def vg(env: dict, *args, cwd=None, ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["vagrant", *map(str, args)], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def box_list(env: dict) -> set[str]:
    """`vagrant box list` lines with the column padding squeezed out."""
    return {" ".join(line.split()) for line in vg(env, "box", "list").stdout.splitlines()}


def outdated(env: dict, proj: Path) -> str:
    """`vagrant box outdated` in a project (its warnings go to stderr); --force
    because Vagrant otherwise skips a check made less than an hour ago."""
    proc = vg(env, "box", "outdated", "--force", cwd=proj)
    text = proc.stdout + proc.stderr
    assert "Checking if box" in text, text
    return text


def test_vagrant_adds_box_file_and_catalog_then_sees_update(ws, built, images, venv, tmp_path):
    vagrant.build_box(None, ws, image="debian-12", name="labforge/debian-12")
    boxes = ws.artifacts / "boxes"
    catalog = boxes / "labforge-debian-12.json"
    # the box file directly
    vg(venv, "box", "add", "--name", "local/direct", boxes / "labforge-debian-12-1.0.0.box")
    # the catalog (file:// URL), which records it as the box's metadata URL
    out = vg(venv, "box", "add", catalog.resolve().as_uri()).stdout
    assert "Successfully added box 'labforge/debian-12' (v1.0.0) for 'libvirt'" in out
    assert box_list(venv) == {"labforge/debian-12 (libvirt, 1.0.0)", "local/direct (libvirt, 0)"}
    assert vagrant.installed_boxes(venv) >= {("labforge/debian-12", "libvirt", "1.0.0")}
    # a project using the box is up to date ...
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "Vagrantfile").write_text('Vagrant.configure("2") { |c| c.vm.box = "labforge/debian-12" }\n')
    assert "A newer version" not in outdated(venv, proj)
    # ... until a second version is added to the catalog
    o, _ = vagrant.build_box(None, ws, image=str(images["over"]), name="labforge/debian-12")
    assert "1.0.1" in o.step
    out = vg(venv, "box", "outdated", "--global").stdout
    assert "'labforge/debian-12' for 'libvirt' is outdated! Current: 1.0.0. Latest: 1.0.1" in out
    assert "A newer version of the box 'labforge/debian-12' for provider 'libvirt'" \
        in outdated(venv, proj)
    out = vg(venv, "box", "update", "--box", "labforge/debian-12").stdout
    assert "Successfully added box 'labforge/debian-12' (v1.0.1) for 'libvirt'" in out
    assert box_list(venv) >= {"labforge/debian-12 (libvirt, 1.0.0)",
                              "labforge/debian-12 (libvirt, 1.0.1)"}
    assert "A newer version" not in outdated(venv, proj)


def test_vagrant_refuses_tampered_box(ws, built, venv):
    vagrant.build_box(None, ws, image="debian-12", name="t/tamper")
    box = ws.artifacts / "boxes" / "t-tamper-1.0.0.box"
    with open(box, "r+b") as fh:           # one byte inside box.img
        fh.seek(box.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    proc = vg(venv, "box", "add", (ws.artifacts / "boxes" / "t-tamper.json").resolve().as_uri(), ok=False)
    assert proc.returncode != 0
    assert "checksum" in (proc.stdout + proc.stderr).lower()
    assert not any("t/tamper" in line for line in box_list(venv))


def test_add_option_runs_vagrant_box_add(cli, ws, built, venv):
    proc = cli("vagrant-box", "--image", "amphora-x64-haproxy", "--name", "labforge/amphora",
               "--add", env=venv, check=True)
    assert "vagrant box add labforge/amphora 1.0.0: built" in proc.stdout
    assert "labforge/amphora (libvirt, 1.0.0)" in box_list(venv)
    proc = cli("vagrant-box", "--image", "amphora-x64-haproxy", "--name", "labforge/amphora",
               "--add", env=venv, check=True)
    assert "vagrant-box labforge/amphora 1.0.0: up to date" in proc.stdout
    assert "vagrant box add labforge/amphora 1.0.0: up to date" in proc.stdout


# --------------------------------------------------------------------------
# the lab's Vagrantfile and networks
# --------------------------------------------------------------------------
TWO_NETS = """\
name: twonet
domain: t.example
networks:
  private: {cidr: 10.100.0.0/24, gateway: 10.100.0.1}
  ext: {cidr: 192.168.77.0/24, dhcp: true, forward: nat, bridge: virbr-ext}
hosts:
  a: {ip: 10.100.0.11, mac: "52:54:00:00:00:0a", cpus: 1, memory: 1024, disk: 8}
  b: {ip: 192.168.77.20, network: ext}
vagrant: {box: acme/base}
"""


def test_network_xml(tmp_path):
    lab = labmod.load(write_lab(tmp_path, TWO_NETS))
    priv = ET.fromstring(libvirt.network_xml(lab, lab.network("private")))
    assert priv.findtext("name") == "private"
    assert priv.find("bridge").get("name") == "lf-private"
    assert priv.find("forward") is None                      # isolated
    assert priv.find("dns").get("enable") == "no"
    ip = priv.find("ip")
    assert (ip.get("address"), ip.get("netmask")) == ("10.100.0.1", "255.255.255.0")
    assert ip.find("dhcp") is None
    ext = ET.fromstring(libvirt.network_xml(lab, lab.network("ext")))
    assert ext.find("bridge").get("name") == "virbr-ext"
    assert ext.find("forward").get("mode") == "nat"
    assert ext.find("ip").get("address") == "192.168.77.1"   # default: first address
    rng = ext.find("ip/dhcp/range")
    assert (rng.get("start"), rng.get("end")) == ("192.168.77.128", "192.168.77.254")


def test_vagrantfile_machines(tmp_path, ws):
    lab = labmod.load(write_lab(tmp_path, TWO_NETS))
    text = vagrant.render_vagrantfile(lab, ws)
    assert 'config.vm.box = "acme/base"' in text
    assert 'config.vm.define "a" do |m|' in text and 'config.vm.define "b" do |m|' in text
    a = text.split('config.vm.define "a"')[1].split("config.vm.define")[0]
    for line in ('ip: "10.100.0.11"', 'libvirt__network_name: "private"',
                 "libvirt__dhcp_enabled: false", 'mac: "52:54:00:00:00:0a"',
                 "libvirt.cpus = 1", "libvirt.memory = 1024", "libvirt.machine_virtual_size = 8",
                 f'seed = "{ws.artifacts.resolve()}/seed/a.iso"',
                 "libvirt.storage :file, device: :cdrom, path: seed",
                 'm.vm.hostname = "a.t.example"'):
        assert line in a, line
    b = text.split('config.vm.define "b"')[1]
    assert 'libvirt__network_name: "ext"' in b and "libvirt__dhcp_enabled: true" in b
    assert "mac:" not in b


def test_vagrantfile_task_writes_records_and_prints_virsh(cli, ws, tmp_path):
    labfile = write_lab(tmp_path, TWO_NETS)
    proc = cli("vagrantfile", "--lab", str(labfile), check=True)
    vdir = ws.artifacts / "vagrant"
    assert (vdir / "Vagrantfile").is_file()
    assert sorted(p.name for p in (vdir / "networks").iterdir()) == ["ext.xml", "private.xml"]
    assert f"virsh net-define {vdir}/networks/private.xml" in proc.stdout
    assert "virsh net-start private" in proc.stdout
    m = Manifest(ws.artifacts)
    assert m.get(vdir / "Vagrantfile")["kind"] == "vagrantfile"
    assert m.get(vdir / "networks" / "ext.xml")["kind"] == "libvirt-network"
    again = cli("vagrantfile", "--lab", str(labfile), check=True)
    assert again.stdout.count("up to date") == 3
    # a network dropped from the lab loses its XML
    labfile.write_text(TWO_NETS.replace("  ext: {cidr: 192.168.77.0/24, dhcp: true, forward: nat, "
                                        "bridge: virbr-ext}\n", "")
                       .replace("  b: {ip: 192.168.77.20, network: ext}\n", ""))
    cli("vagrantfile", "--lab", str(labfile), check=True)
    assert sorted(p.name for p in (vdir / "networks").iterdir()) == ["private.xml"]
    assert m.get("vagrant/networks/ext.xml") is None


def test_vagrantfile_bad_network_writes_nothing(cli, ws, tmp_path):
    labfile = write_lab(tmp_path, TWO_NETS.replace("  b: {ip: 192.168.77.20,",
                                                   "  b: {ip: 192.168.77.200,"))
    proc = cli("vagrantfile", "--lab", str(labfile))
    assert_one_line_error(proc, "hosts.b.ip", "DHCP range 192.168.77.128-192.168.77.254")
    assert not (ws.artifacts / "vagrant").exists()


def test_bridge_names_fit_ifnamsiz_deterministically(tmp_path):
    lab = labmod.load(write_lab(tmp_path, TWO_NETS.replace(
        "hosts:", "  kafka-replication-a: {cidr: 10.9.0.0/24}\n"
                  "  kafka-replication-b: {cidr: 10.9.1.0/24}\nhosts:")))
    a, b = (libvirt.bridge_name(lab.network(n))
            for n in ("kafka-replication-a", "kafka-replication-b"))
    assert len(a) == len(b) == 15 and a.startswith("lf-kafka-r-") and a != b
    assert libvirt.bridge_name(lab.network("kafka-replication-a")) == a      # same lab, same name
    assert libvirt.bridge_name(lab.network("private")) == "lf-private"      # short: as it was
    assert libvirt.bridge_name(lab.network("ext")) == "virbr-ext"           # given: as given
    dup = labmod.load(write_lab(tmp_path, TWO_NETS.replace("bridge: virbr-ext", "bridge: lf-private"),
                                "dup.yaml"))
    with pytest.raises(LabError, match=r"networks\.ext\.bridge: lf-private is also the bridge "
                                       "of network private"):
        libvirt.check_networks(dup)


def test_long_bridge_name_same_answer_from_libvirt_xml_and_vagrantfile(ws, tmp_path):
    """One generator, one set of rules: a network whose default bridge name
    would pass IFNAMSIZ gets the same bridge, the same XML bytes and the same
    manifest kind from `invoke libvirt-xml` and `invoke vagrantfile`."""
    from builders.artifacts.libvirtxml import build_libvirt_xml
    lab = labmod.load(write_lab(tmp_path, TWO_NETS.replace("  private:", "  kafka-private-net:")))
    vagrant.build_vagrantfile(lab, ws)
    build_libvirt_xml(lab, ws, accel="tcg")
    via_vagrant = ws.artifacts / "vagrant" / "networks" / "kafka-private-net.xml"
    via_libvirt = ws.artifacts / "libvirt" / "net-kafka-private-net.xml"
    bridge = ET.parse(via_vagrant).getroot().find("bridge").get("name")
    assert bridge == ET.parse(via_libvirt).getroot().find("bridge").get("name")
    assert len(bridge) <= 15 and bridge.startswith("lf-kafka-p")
    assert via_vagrant.read_bytes() == via_libvirt.read_bytes()
    m = Manifest(ws.artifacts)
    assert m.get(via_vagrant)["kind"] == m.get(via_libvirt)["kind"] == libvirt.NETWORK_KIND
    assert "validates" in (sh("virt-xml-validate", via_vagrant, "network").stdout
                           + sh("virt-xml-validate", via_vagrant, "network").stderr)
    # each builder keeps to its own files: a vagrantfile run does not drop libvirt-xml's
    vagrant.build_vagrantfile(lab, ws, force=True)
    assert via_libvirt.exists() and m.get(via_libvirt) is not None


def test_vagrant_validate_accepts_lab_vagrantfile(cli, ws, venv, built, tmp_path):
    """The default lab, with a box catalog and seed ISOs present: vagrant-libvirt's
    own validation runs (it rejects, e.g., a malformed MAC) and passes."""
    vagrant.build_box(None, ws, image="debian-12", name="labforge/debian-12")
    seed = ws.artifact_dir("seed")
    for h in ("broker1", "broker2", "broker3"):
        (seed / f"{h}.iso").write_bytes(b"\0" * 2048)
    ssh = ws.certs_dir("ssh")
    (ssh / "lab").write_text("key")
    (ssh / "lab.pub").write_text("ssh-ed25519 AAAA lab")
    cli("vagrantfile", check=True)
    vdir = ws.artifacts / "vagrant"
    text = (vdir / "Vagrantfile").read_text()
    assert f'config.vm.box_url = "{(ws.artifacts / "boxes" / "labforge-debian-12.json").resolve().as_uri()}"' in text
    assert f'config.ssh.private_key_path = "{(ssh / "lab").resolve()}"' in text
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(vdir / "Vagrantfile", proj)
    out = vg(venv, "validate", cwd=proj).stdout
    assert "Vagrantfile validated successfully" in out
    # the same check fails on a broken provider setting: validation is real
    (proj / "Vagrantfile").write_text(text.replace('"52:54:00:64:00:0b"', '"zz:54"'))
    proc = vg(venv, "validate", cwd=proj, ok=False)
    assert proc.returncode != 0 and "Libvirt Provider" in proc.stdout + proc.stderr


def test_vagrantfile_attaches_the_seed_where_the_seed_builder_wrote_it(cli, ws, venv, built,
                                                                       tmp_path):
    """A host whose seed carries certs/ material has it under certs/seed/: the
    Vagrantfile must attach that file (not a missing artifacts/seed/ one, which
    would boot the VM without its seed), and Vagrant still accepts it."""
    labfile = lab_file(tmp_path, **{"hosts.broker1.write_files": [
        {"path": "/etc/kafka/ssl/broker1.keystore.jks",
         "source": "certs:kafka/broker1.keystore.jks", "permissions": "0600"}]})
    cli("certs", "--lab", str(labfile), check=True)
    cli("seed-iso", "--lab", str(labfile), check=True)
    secret = ws.certs / "seed" / "broker1.iso"
    assert secret.is_file() and not (ws.artifacts / "seed" / "broker1.iso").exists()
    cli("vagrantfile", "--lab", str(labfile), check=True)
    text = (ws.artifacts / "vagrant" / "Vagrantfile").read_text()
    b1 = text.split('config.vm.define "broker1"')[1].split("config.vm.define")[0]
    b2 = text.split('config.vm.define "broker2"')[1].split("config.vm.define")[0]
    assert f'seed = "{secret.resolve()}"' in b1, b1
    # broker2's seed is secret too: the Kafka node configuration ships its keystore
    assert f'seed = "{(ws.certs / "seed" / "broker2.iso").resolve()}"' in b2, b2
    assert "PRIVATE KEY" not in text
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ws.artifacts / "vagrant" / "Vagrantfile", proj)
    assert "Vagrantfile validated successfully" in vg(venv, "validate", cwd=proj).stdout


def test_vagrantfile_says_when_a_host_has_only_a_vfat_seed(cli, ws, tmp_path):
    """vagrant-libvirt can attach a seed only as a cdrom, which a vfat image is
    not: the run says so instead of rendering a machine that boots unseeded."""
    cli("certs", check=True)
    cli("seed-iso", "--format", "vfat", check=True)
    proc = cli("vagrantfile", check=True)
    assert "broker1, broker2, broker3: only a vfat seed" in proc.stdout, proc.stdout
    text = (ws.artifacts / "vagrant" / "Vagrantfile").read_text()
    assert f'seed = "{(ws.certs / "seed" / "broker1.iso").resolve()}"' in text


def test_network_xml_valid_against_libvirt_schema(ws, tmp_path):
    lab = labmod.load(write_lab(tmp_path, TWO_NETS))
    for net in lab.networks:
        f = tmp_path / f"{net.name}.xml"
        f.write_text(libvirt.network_xml(lab, net))
        assert "validates" in sh("virt-xml-validate", f, "network").stdout + \
            sh("virt-xml-validate", f, "network").stderr


def test_virsh_defines_and_starts_lab_network(libvirtd, ws, tmp_path):
    """The rendered XML through the documented commands; a unique name and
    subnet so nothing on the host clashes; removed afterwards."""
    tag = secrets.token_hex(3)
    name = f"lft{tag}"
    prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    lab = labmod.load(write_lab(tmp_path, f"""\
name: virshtest
networks:
  {name}: {{cidr: {prefix}.0/24}}
hosts:
  h1: {{ip: {prefix}.11}}
"""))
    net = lab.networks[0]
    xml = tmp_path / f"{name}.xml"
    xml.write_text(libvirt.network_xml(lab, net))
    virsh = ["virsh", "-c", libvirtd]
    try:
        sh(*virsh, "net-define", xml)
        sh(*virsh, "net-start", name)
        info = sh(*virsh, "net-info", name).stdout
        assert "Active:         yes" in info and f"lf-{name}" in info
        addr = sh("ip", "-o", "-4", "addr", "show", f"lf-{name}").stdout
        assert f"{net.cidr.network_address + 1}/24" in addr
        dumped = ET.fromstring(sh(*virsh, "net-dumpxml", name).stdout)
        assert dumped.find("ip").get("address") == str(net.cidr.network_address + 1)
        assert dumped.find("ip/dhcp") is None and dumped.find("forward") is None
    finally:
        subprocess.run([*virsh, "net-destroy", name], capture_output=True)
        subprocess.run([*virsh, "net-undefine", name], capture_output=True)


def test_virsh_defines_nat_dhcp_network(libvirtd, tmp_path):
    """A NAT network with DHCP is accepted as written (defined only: starting
    it needs dnsmasq and a firewall, which the lab's private networks do not)."""
    name = f"lfn{secrets.token_hex(3)}"
    lab = labmod.load(write_lab(tmp_path, f"""\
name: virshnat
networks:
  {name}: {{cidr: 10.251.{secrets.randbelow(250)}.0/24, dhcp: true, forward: nat}}
"""))
    xml = tmp_path / f"{name}.xml"
    xml.write_text(libvirt.network_xml(lab, lab.networks[0]))
    virsh = ["virsh", "-c", libvirtd]
    try:
        sh(*virsh, "net-define", xml)
        dumped = ET.fromstring(sh(*virsh, "net-dumpxml", "--inactive", name).stdout)
        assert dumped.find("forward").get("mode") == "nat"
        assert dumped.find("ip/dhcp/range") is not None
    finally:
        subprocess.run([*virsh, "net-undefine", name], capture_output=True)


def test_add_without_vagrant_is_skipped_with_the_command(ws, built, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"                  # qemu-img but no vagrant on PATH
    bindir.mkdir()
    (bindir / "qemu-img").symlink_to(shutil.which("qemu-img"))
    monkeypatch.setenv("PATH", str(bindir))
    box, _, add = vagrant.build_box(None, ws, image="debian-12", name="t/b", add=True)
    assert box.status == "built"
    assert add.status == "skipped" and "vagrant is not installed" in add.detail
    assert "vagrant box add file://" in add.detail


def test_pipeline_step(ws, built, default_lab):
    """`invoke all`'s step: the lab's base image as vagrant.box, then the Vagrantfile."""
    outcomes = vagrant.build_lab_vagrant(default_lab, ws)
    assert outcomes[0].step == "vagrant-box labforge/debian-12 1.0.0"
    assert outcomes[0].status == "built"
    assert {o.status for o in outcomes[1:]} == {"built"}
    assert (ws.artifacts / "vagrant" / "Vagrantfile").is_file()
    again = vagrant.build_lab_vagrant(default_lab, ws)
    assert {o.status for o in again} == {"up to date"}
    # what the step declares is exactly what it recorded, under the same kinds
    declared = vagrant.VAGRANT.outputs(default_lab, ws)
    assert [o.path for o in declared] == [p for o in outcomes for p in o.paths]
    m = Manifest(ws.artifacts)
    assert all(m.get(o.path)["kind"] == o.kind for o in declared)
    assert vagrant.VAGRANT.ready(default_lab, ws) is None


def test_pipeline_step_without_base_image(ws, default_lab):
    box, *rest = vagrant.build_lab_vagrant(default_lab, ws)
    assert box.status == "skipped" and "no base image debian-12" in box.detail
    assert rest and all(o.status == "built" for o in rest)
