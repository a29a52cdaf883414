"""Benchmark: seed ISOs for a 50-host lab, labforge vs cloud-localds.

    .venv/bin/python benchmarks/bench_seediso.py [--hosts 50] [--repeat 3]

Same content on both sides: labforge renders each host's meta-data,
network-config and user-data; cloud-localds gets exactly those files
(`cloud-localds -N network-config out.iso user-data meta-data`, which runs
genisoimage -volid cidata -joliet -rock).  Wall times, medians of --repeat runs:

- labforge, one `labforge seed-iso --force` building all hosts (process start included)
- labforge, build_seed_isos() in process
- cloud-localds, one run per host (what a shell loop over hosts does)
- one ISO from the command line: `labforge seed-iso --host h1 --force`, next to
  one cloud-localds run
- the floor of any seed-iso command: Python importing the libraries a seed
  needs (PyYAML, jsonschema for cloud-init's schema, pycdlib), nothing else
- a diagnostic, not a mode of labforge: the same 50-ISO command with
  cloud-init's schema check taken out (cloud-localds does no such check),
  to show what the rest of the command costs

Single-ISO rows are medians of max(5, --repeat) runs.  The CPU column (user+sys,
children included) shows the work itself on a machine shared with other
builds, where wall times swing with the load; a quiet second before each row
labels the figures idle or loaded (benchmarks/conditions.py).  Prints a table and writes benchmarks/results/seediso.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from builders.core import lab as labmod  # noqa: E402
from builders.artifacts.seed import build_seed_isos, read_seed, render  # noqa: E402
from builders.core.workspace import Workspace  # noqa: E402
from conditions import Conditions, cpu_seconds  # noqa: E402


def lab_text(n: int) -> str:
    hosts = "".join(
        f"  h{i}:\n    ip: 10.100.{i // 200}.{i % 200 + 10}\n"
        f"    mac: \"52:54:00:64:{i // 256:02x}:{i % 256:02x}\"\n"
        f"    packages: [openjdk-17-jre-headless]\n"
        f"    runcmd: [\"systemctl enable --now kafka\"]\n"
        f"    write_files:\n"
        f"      - {{path: /etc/kafka/server.properties, content: \"broker.id={i}\\n\"}}\n"
        for i in range(1, n + 1))
    return (f"name: bench\ndomain: lab.internal\nnetworks:\n  private: {{cidr: 10.100.0.0/16}}\n"
            f"hosts:\n{hosts}")


# `labforge` with the cloud-init schema check taken out, for the diagnostic
# row; it fails loudly if the seed builder no longer has that function
WITHOUT_CHECK = (
    "import sys\n"
    "from builders.artifacts.seed import rendering\n"
    "assert callable(rendering._schema_check), 'the schema check moved'\n"
    "rendering._schema_check = lambda *args: None\n"
    "from builders.cli import main\n"
    "main(['labforge', *sys.argv[1:]])\n")

CPU: dict[str, float] = {}          # CPU seconds (user+sys, children included) of the median run


def median_of(fn, repeat: int, key: str | None = None) -> float:
    """Median wall time of ``repeat`` runs; the CPU time of that run goes to
    CPU[key] (on a shared machine, CPU time shows the work itself)."""
    runs = []
    for _ in range(repeat):
        c0 = cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        runs.append((wall, cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) - c0))
    wall, cpu = sorted(runs)[len(runs) // 2]
    if key:
        CPU[key] = cpu
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    localds = shutil.which("cloud-localds")
    if not localds:
        print("cloud-localds not found: apt-get install cloud-image-utils genisoimage",
              file=sys.stderr)
        return 1

    # as installed: pip byte-compiles a package (a checkout under
    # PYTHONDONTWRITEBYTECODE would recompile every module on every run)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builders")],
                   check=True, capture_output=True)
    cond = Conditions()
    tmp = Path(tempfile.mkdtemp(prefix="bench-seediso-"))
    try:
        ws = Workspace(tmp / "ws")
        key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (ws.certs / "ssh").mkdir(parents=True)
        (ws.certs / "ssh" / "lab_ed25519.pub").write_bytes(key + b" bench\n")
        lab_file = tmp / "lab.yaml"
        lab_file.write_text(lab_text(args.hosts))
        lab = labmod.load(lab_file)
        names = [h.name for h in lab.hosts]

        # the same content for cloud-localds
        src = tmp / "src"
        for h in names:
            d = src / h
            d.mkdir(parents=True)
            for fname, data in render(lab, ws, h).files.items():
                (d / fname).write_bytes(data)

        env = dict(os.environ, LABFORGE_WORKDIR=str(ws.root))
        script = Path(sys.executable).parent / "labforge"
        invoke = [str(script)] if script.is_file() else [sys.executable, "-m", "invoke", "-r", str(ROOT)]

        # --force alone would find every seed's bytes already on disk and
        # write nothing (the stage skips identical files): remove them first
        def fresh(hosts=names):
            for h in hosts:
                (ws.artifacts / "seed" / f"{h}.iso").unlink(missing_ok=True)

        def lf_cli_all():
            fresh()
            subprocess.run([*invoke, "seed-iso", "--lab", str(lab_file), "--force"], env=env,
                           check=True, capture_output=True)

        def lf_cli_all_unchecked():
            fresh()
            subprocess.run([sys.executable, "-c", WITHOUT_CHECK, "seed-iso", "--lab",
                            str(lab_file), "--force"], env=env, check=True, capture_output=True,
                           cwd=ROOT)      # builders/ importable from a checkout too

        def lf_lib_all():
            fresh()
            build_seed_isos(lab, ws, force=True)

        def lf_cli_one():
            fresh(["h1"])
            subprocess.run([*invoke, "seed-iso", "--lab", str(lab_file), "--host", "h1",
                            "--force"], env=env, check=True, capture_output=True)

        def import_floor():
            subprocess.run([sys.executable, "-c", "import yaml, jsonschema, pycdlib"],
                           check=True, capture_output=True)

        def lf_lib_one():
            fresh(["h1"])
            build_seed_isos(lab, ws, hosts=["h1"], force=True)

        out = tmp / "localds"
        out.mkdir()

        def localds_all():
            for h in names:
                d = src / h
                subprocess.run([localds, "-N", str(d / "network-config"), str(out / f"{h}.iso"),
                                str(d / "user-data"), str(d / "meta-data")],
                               check=True, capture_output=True)

        def localds_one():
            d = src / "h1"
            subprocess.run([localds, "-N", str(d / "network-config"), str(out / "one.iso"),
                            str(d / "user-data"), str(d / "meta-data")],
                           check=True, capture_output=True)

        n1 = max(5, args.repeat)

        def measured(fn, repeat: int, key: str) -> float:
            cond.quiet()                        # a quiet window before each row
            return median_of(fn, repeat, key)

        t_cli = measured(lf_cli_all, args.repeat, "cli_all")
        t_unchecked = measured(lf_cli_all_unchecked, args.repeat, "cli_all_unchecked")
        t_lib = measured(lf_lib_all, args.repeat, "lib_all")
        t_ds = measured(localds_all, args.repeat, "ds_all")
        t_one = measured(lf_cli_one, n1, "cli_one")
        t_floor = measured(import_floor, n1, "floor")
        t_lib_one = measured(lf_lib_one, n1, "lib_one")
        t_ds_one = measured(localds_one, n1, "ds_one")

        # sanity: both sides hold the same files
        for h in (names[0], names[-1]):
            ours = read_seed(ws.artifacts / "seed" / f"{h}.iso")
            theirs = read_seed(out / f"{h}.iso")
            assert ours == theirs, f"{h}: contents differ"

        rows = [
            (f"labforge CLI, {len(names)} ISOs (one command)", t_cli, t_ds / t_cli, "cli_all"),
            ("  the same, schema check left out", t_unchecked, t_ds / t_unchecked,
             "cli_all_unchecked"),
            (f"labforge library, {len(names)} ISOs", t_lib, t_ds / t_lib, "lib_all"),
            (f"cloud-localds, {len(names)} runs", t_ds, 1.0, "ds_all"),
            ("labforge CLI, one ISO", t_one, t_ds_one / t_one, "cli_one"),
            ("  python importing yaml, jsonschema, pycdlib", t_floor, None, "floor"),
            ("labforge library, one ISO", t_lib_one, t_ds_one / t_lib_one, "lib_one"),
            ("cloud-localds, one run", t_ds_one, 1.0, "ds_one"),
        ]
        conditions = cond.finish()
        print(f"\nseed ISOs for a {len(names)}-host lab, median of {args.repeat} runs "
              f"(single-ISO rows: {n1}); {cond.describe()}\n")
        print(f"{'what':<42} {'wall s':>8} {'CPU s':>7} {'cloud-localds / this':>21}")
        for what, secs, ratio, key in rows:
            r = f"{ratio:.1f}x" if ratio is not None else "-"
            print(f"{what:<42} {secs:>8.3f} {CPU.get(key, 0):>7.3f} {r:>21}")
        print(f"\ntarget: CLI >= 5x faster than cloud-localds: "
              f"{'met' if t_ds / t_cli >= 5 else 'NOT met'}; one ISO <= 0.25 s: "
              f"{'met' if t_one <= 0.25 else 'NOT met'}")
        cond.warn()
        result = {
            "hosts": len(names), "repeat": args.repeat, "statistic": "median",
            **conditions,
            "labforge_cli_all_s": t_cli, "labforge_lib_all_s": t_lib,
            "diagnostic_cli_all_without_schema_check_s": t_unchecked,
            "cloud_localds_all_s": t_ds, "labforge_cli_one_s": t_one,
            "libraries_import_s": t_floor, "labforge_lib_one_s": t_lib_one,
            "cloud_localds_one_s": t_ds_one, "cpu_s": CPU,
            "ratio_cli": t_ds / t_cli, "ratio_lib": t_ds / t_lib,
            "cloud_localds": subprocess.run(["dpkg-query", "-W", "-f=${Version}",
                                             "cloud-image-utils"], capture_output=True,
                                            text=True).stdout,
        }
        res_dir = ROOT / "benchmarks" / "results"
        res_dir.mkdir(parents=True, exist_ok=True)
        (res_dir / "seediso.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {res_dir / 'seediso.json'}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
