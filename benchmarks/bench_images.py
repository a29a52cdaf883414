"""Benchmark: overlay creation vs base size, and cold vs warm base builds.

    .venv/bin/python benchmarks/bench_images.py [--skip-build] [--runs N]

1. Overlays: labforge's `build_overlays` (three hosts: checks, qemu-img
   create -F qcow2, chain check, manifest) against the classic
   `qemu-img create -b` alone, on a 1 GiB and a 10 GiB virtual base (data
   in proportion: 64 and 640 MiB), and against copying the base (what "a
   disk per VM" costs without backing files).  Overlay time should not
   depend on the base size.
2. Base image builds with diskimage-builder: labforge cold (empty cache/),
   warm with --force (DIB runs again from labforge's cached package layer)
   and warm as a CI job with cache/ restored and artifacts/ empty (labforge
   reuses the image built from the same inputs); the target is warm <= 50%
   of cold.  Then the classic tool: plain `disk-image-create` with the same
   elements, packages, mirrors and DIB caches (its own debootstrap tarball
   and apt archives), cold and warm.  Needs root and the network path to the
   Debian mirror; skip with --skip-build (--skip-classic for the second).

Prints a table and writes benchmarks/results/bench_images.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builders.tools import dib  # noqa: E402
from builders.core import lab as labmod  # noqa: E402
from builders.artifacts.baseimage import BUILD_ELEMENTS, BUILD_PACKAGES, build_base_image, release  # noqa: E402
from builders.core.manifest import Manifest  # noqa: E402
from builders.artifacts.overlays import build_overlays  # noqa: E402
from builders.core.workspace import Workspace  # noqa: E402
from conditions import Conditions  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_overlays(runs: int) -> list[dict]:
    lab = labmod.load()
    rows = []
    for size in ("1G", "10G"):
        with tempfile.TemporaryDirectory(prefix="bench-ovl-") as tmp:
            ws = Workspace(Path(tmp) / "ws")
            base = ws.artifacts / "images" / "debian-12.qcow2"
            base.parent.mkdir(parents=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), size], check=True)
            # data in proportion to the size (1/16: 64 MiB, 640 MiB), spread over the disk
            gib = 1 if size == "1G" else 10
            step, chunk = gib * 1024 // 8, gib * 8
            cmds = sum((["-c", f"write -P 0x{i + 1:x} {i * step}M {chunk}M"] for i in range(8)), [])
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(base)], check=True,
                           capture_output=True)
            # as after `invoke base-image`: the base is in the manifest (hashed once there)
            Manifest(ws.artifacts).record(base, "base-image", "bench")
            lf, classic, copy = [], [], []
            for _ in range(runs):
                shutil.rmtree(ws.artifacts / "vms", ignore_errors=True)
                lf.append(_timed(lambda: build_overlays(lab, ws, force=True)))
                out = Path(tmp) / "classic"
                out.mkdir(exist_ok=True)

                def qemu_img():
                    for h in lab.hosts:
                        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                                        "-F", "qcow2", str(out / f"{h.name}.qcow2"), "20G"],
                                       check=True)
                classic.append(_timed(qemu_img))

                def cp():
                    for h in lab.hosts:
                        shutil.copyfile(base, out / f"{h.name}-copy.qcow2")
                copy.append(_timed(cp))
            rows.append({"base": size, "hosts": len(lab.hosts),
                         "labforge_s": statistics.median(lf),
                         "qemu_img_s": statistics.median(classic),
                         "full_copy_s": statistics.median(copy)})
    return rows


def bench_build(workdir: Path, cond: Conditions) -> dict:
    lab = labmod.load()
    ws = Workspace(workdir)
    shutil.rmtree(ws.root, ignore_errors=True)
    cond.quiet()
    cold = _timed(lambda: build_base_image(lab, ws, force=True))
    # --force: DIB runs again, from the cached package layer
    cond.quiet()
    warm = _timed(lambda: build_base_image(lab, ws, force=True))
    # a CI job that restores cache/ but starts with an empty artifacts/
    shutil.rmtree(ws.artifacts)
    cond.quiet()
    warm_ci = _timed(lambda: build_base_image(lab, ws))
    return {"cold_s": cold, "warm_dib_caches_s": warm, "warm_dib_over_cold": warm / cold,
            "warm_labforge_cache_s": warm_ci, "warm_labforge_over_cold": warm_ci / cold,
            "cache": str(ws.cache / "dib")}


def bench_classic(workdir: Path, cond: Conditions) -> dict:
    """Plain disk-image-create (what users run by hand), cold then warm with its caches."""
    lab = labmod.load()
    ws = Workspace(workdir)
    shutil.rmtree(ws.root, ignore_errors=True)
    out = ws.artifact_dir("classic")
    cmd = dib.dib_command(lab, ws, exe=str(dib.dib_executable()), elements=BUILD_ELEMENTS,
                          workdir=out, packages=BUILD_PACKAGES, image_size=lab.base_image.size,
                          env={"DIB_RELEASE": release(lab).codename, "DIB_GRUB_TIMEOUT": "1"})
    argv = [a for a in cmd.argv if a != "-u"]          # DIB compresses, as it does by default
    env = {**cmd.env, "PATH": f"{Path(cmd.argv[0]).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    if not dib.has_device_mapper():
        env["PATH"] = f"{dib.STANDIN_DIR}:{env['PATH']}"
    runs = []
    with open(ws.artifact_dir("logs") / "classic-dib.log", "w") as log:
        for _ in range(2):
            cond.quiet()
            runs.append(_timed(lambda: subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                      check=True)))
    return {"classic_cold_s": runs[0], "classic_warm_s": runs[1], "classic_warm_over_cold": runs[1] / runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-build", action="store_true", help="only the overlay benchmark")
    ap.add_argument("--skip-classic", action="store_true",
                    help="no plain disk-image-create runs (saves two builds)")
    ap.add_argument("--runs", type=int, default=3, help="runs per overlay measurement")
    ap.add_argument("--workdir", default=str(ROOT / "cache" / "bench-images"),
                    help="workspace for the build benchmark (its cache is wiped first)")
    args = ap.parse_args()

    cond = Conditions()
    result: dict = {"overlays": bench_overlays(args.runs)}
    print("overlay creation, 3 hosts (median seconds)")
    print(f"{'base':>5} {'labforge':>9} {'qemu-img':>9} {'copy':>8} {'lf/qemu-img':>12}")
    for r in result["overlays"]:
        print(f"{r['base']:>5} {r['labforge_s']:9.3f} {r['qemu_img_s']:9.3f} {r['full_copy_s']:8.3f} "
              f"{r['labforge_s'] / r['qemu_img_s']:12.2f}")
    o = result["overlays"]
    print(f"labforge 10G/1G: {o[1]['labforge_s'] / o[0]['labforge_s']:.2f} "
          f"(constant time ~1.0); copy 10G/1G: {o[1]['full_copy_s'] / o[0]['full_copy_s']:.2f}")

    if not args.skip_build:
        b = bench_build(Path(args.workdir), cond)
        result["build"] = b
        print("\nbase image build (diskimage-builder, debian-minimal vm cloud-init ...)")
        print(f"{'run':<44} {'seconds':>8} {'/cold':>6}")
        print(f"{'cold (empty cache/)':<44} {b['cold_s']:8.0f} {1:6.2f}")
        print(f"{'warm --force (package layer)':<44} {b['warm_dib_caches_s']:8.0f} "
              f"{b['warm_dib_over_cold']:6.2f}")
        print(f"{'warm, artifacts/ wiped, cache/ kept (CI)':<44} {b['warm_labforge_cache_s']:8.0f} "
              f"{b['warm_labforge_over_cold']:6.2f}")
        if not args.skip_classic:
            c = bench_classic(Path(args.workdir + "-classic"), cond)
            b.update(c)
            print(f"{'classic disk-image-create, cold':<44} {c['classic_cold_s']:8.0f} "
                  f"{c['classic_cold_s'] / b['cold_s']:6.2f}")
            print(f"{'classic disk-image-create, warm (DIB caches)':<44} {c['classic_warm_s']:8.0f} "
                  f"{c['classic_warm_s'] / b['cold_s']:6.2f}")
            print(f"labforge warm / classic warm: {b['warm_dib_caches_s'] / c['classic_warm_s']:.2f}")
        print("target: warm <= 0.50 of cold (one run of each)")
    result.update(cond.finish())
    print(cond.describe())
    cond.warn()
    out = ROOT / "benchmarks" / "results" / "bench_images.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
