"""Benchmark: packing a base image as a vagrant-libvirt box.

labforge (`builders.artifacts.vagrant.build_box`: plain tar streamed with sha256 while
writing) against vagrant-libvirt's own `create_box.sh` (tar piped through
gzip, or pigz when installed), on the same image in one run; then both boxes
are given to the real `vagrant box add` (temporary VAGRANT_HOME) to prove
Vagrant accepts them.

    .venv/bin/python benchmarks/bench_vagrant.py [--image FILE]

The image is artifacts/images/debian-12.qcow2 when it was built, else a
synthetic 2 GiB-virtual qcow2 holding ~200 MiB of real file content from
/usr (compressible) and ~200 MiB of random bytes (like already-compressed
packages).  Results go to benchmarks/results/vagrant.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builders.artifacts import vagrant  # noqa: E402
from builders.core.workspace import Workspace  # noqa: E402
from conditions import Conditions  # noqa: E402

CREATE_BOX = Path("/usr/share/doc/vagrant-libvirt/examples/create_box.sh")


def make_image(d: Path) -> Path:
    raw = d / "synthetic.raw"
    with open(raw, "wb") as fh:
        fh.truncate(2 << 30)
        fh.seek(1 << 20)
        left = 200 << 20                      # real file content: compressible
        for p in sorted(Path("/usr/lib").rglob("*")):
            if left <= 0:
                break
            try:
                if p.is_file() and not p.is_symlink():
                    data = p.read_bytes()[:left]
                    fh.write(data)
                    left -= len(data)
            except OSError:
                continue
        fh.seek(1 << 30)
        for _ in range(200):                  # random: like compressed packages
            fh.write(os.urandom(1 << 20))
    img = d / "debian-12.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, img], check=True)
    raw.unlink()
    return img


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(8 << 20):
            pass


def box_add(box: Path, name: str, home: Path) -> tuple[bool, float, str]:
    env = dict(os.environ, VAGRANT_HOME=str(home), VAGRANT_CHECKPOINT_DISABLE="1")
    os.sync()                      # no earlier step's writeback in this timing
    t = time.monotonic()
    proc = subprocess.run(["vagrant", "box", "add", "--name", name, str(box)], env=env,
                          capture_output=True, text=True)
    secs = time.monotonic() - t
    listed = subprocess.run(["vagrant", "box", "list"], env=env, capture_output=True, text=True).stdout
    ok = proc.returncode == 0 and any(line.split()[:2] == [name, "(libvirt,"]
                                      for line in listed.splitlines() if line.strip())
    return ok, secs, (proc.stdout + proc.stderr).strip().splitlines()[-1:][0] if not ok else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="qcow2 to pack (default: artifacts/images/debian-12.qcow2 "
                                    "or a synthetic one)")
    args = ap.parse_args()
    cond = Conditions()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vagrant-"))
    try:
        ws_default = Workspace.default()
        if args.image:
            image, origin = Path(args.image).resolve(), "given"
        elif (ws_default.artifacts / "images" / "debian-12.qcow2").is_file():
            image, origin = ws_default.artifacts / "images" / "debian-12.qcow2", "built base image"
        else:
            print("making a synthetic image (no artifacts/images/debian-12.qcow2)...", file=sys.stderr)
            image, origin = make_image(tmp), "synthetic"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", image],
                                         check=True, capture_output=True).stdout)
        size = image.stat().st_size
        warm(image)
        os.sync()
        cond.quiet()

        # labforge
        ws = Workspace(tmp / "ws")
        t = time.monotonic()
        vagrant.build_box(None, ws, image=str(image), name="bench/labforge", version="1.0.0")
        t_lab = time.monotonic() - t
        lab_box = vagrant.box_path(ws, "bench/labforge", "1.0.0")

        # vagrant-libvirt's create_box.sh, on a copy (it moves the image around)
        classic_dir = tmp / "classic"
        classic_dir.mkdir()
        copy = classic_dir / "debian-12.qcow2"
        shutil.copyfile(image, copy)
        warm(copy)
        os.sync()
        cond.quiet()
        gz = "pigz" if shutil.which("pigz") else "gzip"
        if CREATE_BOX.is_file():
            argv = ["bash", str(CREATE_BOX), str(copy), "classic.box"]
            how = f"create_box.sh (tar | {gz})"
        else:  # the same pipeline, spelled out
            argv = ["bash", "-c", f"set -e; mkdir t; cp {copy} t/box.img; cd t; "
                    f"echo '{{\"provider\":\"libvirt\",\"format\":\"qcow2\",\"virtual_size\":"
                    f"{-(-info['virtual-size'] // 2**30)}}}' > metadata.json; "
                    "printf 'Vagrant.configure(\"2\") do |c| end\\n' > Vagrantfile; "
                    f"tar cv -S --totals ./metadata.json ./Vagrantfile ./box.img | {gz} -c "
                    "> ../classic.box"]
            how = f"tar | {gz} (create_box.sh's pipeline)"
        t = time.monotonic()
        subprocess.run(argv, cwd=classic_dir, check=True, capture_output=True)
        t_classic = time.monotonic() - t
        classic_box = classic_dir / "classic.box"

        # both must be accepted by the real Vagrant
        home = tmp / "vagrant-home"
        ok_lab, add_lab, err_lab = box_add(lab_box, "bench/labforge", home)
        ok_cl, add_cl, err_cl = box_add(classic_box, "bench/classic", home)

        ratio = t_classic / t_lab
        rows = [
            ("labforge vagrant-box (plain tar, sha256)", t_lab, lab_box.stat().st_size, add_lab, ok_lab),
            (how, t_classic, classic_box.stat().st_size, add_cl, ok_cl),
        ]
        print(f"image: {image} ({origin}), {size / 2**20:.0f} MiB file, "
              f"{info['virtual-size'] / 2**30:.1f} GiB virtual")
        print(f"{'packer':<44} {'pack s':>8} {'box MiB':>8} {'add s':>7}  accepted")
        for name, secs, bsize, add_s, ok in rows:
            print(f"{name:<44} {secs:>8.2f} {bsize / 2**20:>8.0f} {add_s:>7.2f}  {'yes' if ok else 'NO'}")
        print(f"speed-up: {ratio:.1f}x (target >= 3x)"
              + ("" if ok_lab and ok_cl else f"; vagrant refused: {err_lab or err_cl}"))
        result = {
            "benchmark": "vagrant-box", "image": str(image), "origin": origin,
            "image_bytes": size, "virtual_size": info["virtual-size"],
            "labforge": {"seconds": round(t_lab, 3), "box_bytes": lab_box.stat().st_size,
                         "vagrant_box_add_seconds": round(add_lab, 3), "accepted": ok_lab},
            "classic": {"how": how, "seconds": round(t_classic, 3),
                        "box_bytes": classic_box.stat().st_size,
                        "vagrant_box_add_seconds": round(add_cl, 3), "accepted": ok_cl},
            "speedup": round(ratio, 2), **cond.finish(),
        }
        print(cond.describe())
        cond.warn()
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "vagrant.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if ok_lab and ok_cl else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
