"""Benchmark: labforge build-amphora vs upstream's diskimage-create.sh.

Runs, on this machine, in one go:

1. labforge cold: ``build_amphora --force`` with an empty cache (the builder
   image is built first and not timed, both sides use it), and
2. upstream cold, alternating with it, ``--cold-runs`` times each (default
   3; the medians are compared);
3. labforge forced warm rebuild (``force=True``, cache kept);
4. labforge "up to date".

Upstream is Octavia's own ``diskimage-create/diskimage-create.sh`` from the
   same sdist, in the same builder image, with an empty cache of its own.
   Upstream's script refuses ``-i debian``; it does honour a full element
   override (``DIB_ELEMENTS``) and ``-d RELEASE``, so it is given exactly
   the element list labforge uses (upstream's list with debian-minimal and
   labforge's two local elements) and bookworm.  The DIB environment is the
   same (mirrors, local sources, CA), minus labforge's bootstrap tarball
   cache and package layer, which upstream's script does not set.

The seconds of each DIB phase (from dib-run-parts' profiling tables in
the build logs) show where the two differ.  Prints a table with ratios and
writes benchmarks/results/amphora.json.

    .venv/bin/python benchmarks/bench_amphora.py [--cold-runs 3] [--skip-upstream]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builders.artifacts import amphora  # noqa: E402
from builders.tools import dib, docker_engine  # noqa: E402

from builders.core import lab as labmod  # noqa: E402
from builders.core.console import progress, setup_logging  # noqa: E402
from builders.core.workspace import Workspace  # noqa: E402
from conditions import Conditions  # noqa: E402


def upstream_build(lb, ws: Workspace, cache: Path, out: Path) -> float:
    cli = docker_engine.client(ws)
    s = amphora.settings(lb)
    logfh = open(ws.artifact_dir("logs") / "upstream-amphora.log", "w")
    with progress("upstream", None, "s") as bar:
        tag = docker_engine.ensure_builder(lb, ws, cli, s, logfh, bar)
        env = amphora.dib_environment(lb, ws, s)
        for k in ("DIB_DEBOOTSTRAP_CACHE", "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE", "DIB_IMAGE_CACHE",
                  "DIB_MMDEBSTRAP_EXTRA_ARGS"):
            env.pop(k, None)
        env["ELEMENTS_PATH"] = ":".join(docker_engine.BUILDER_ELEMENTS_PATH)
        env["DIB_ELEMENTS"] = " ".join(amphora.elements(s))
        env["DIB_LOCAL_ELEMENTS_PATH"] = "/opt/labforge/elements"
        env["PATH"] = dib.in_builder(cli, tag).path
        script = ("set -e; "
                  "exec /opt/labforge/src/octavia/diskimage-create/diskimage-create.sh "
                  f"-d {s['release']} -s {s['size']} -c /cache -o /out/upstream-amphora.qcow2")
        t0 = time.monotonic()
        c = cli.containers.run(tag, ["bash", "-c", script], detach=True, network_mode="host",
                               environment=env, working_dir="/build",
                               volumes={"/dev": {"bind": "/dev", "mode": "rw"},
                                        str(cache): {"bind": "/cache", "mode": "rw"},
                                        str(out): {"bind": "/out", "mode": "rw"}},
                               **docker_engine.device_access())
        try:
            for chunk in c.logs(stream=True, follow=True):
                logfh.write(chunk.decode("utf-8", "replace"))
                bar.set_description("building")
            code = c.wait()["StatusCode"]
        finally:
            c.remove(force=True)
        secs = time.monotonic() - t0
    logfh.close()
    if code != 0 or not (out / "upstream-amphora.qcow2").is_file():
        raise SystemExit(f"upstream build failed ({code}); see {logfh.name}")
    return secs


def dib_phases(log: Path) -> dict[str, float]:
    """Seconds per DIB phase (root.d, install.d, ...) from the profiling
    tables dib-run-parts prints after each phase (summed when a phase runs
    twice); the phases outside dib-run-parts (disk, conversion) are the
    rest of the build's time."""
    phases: dict[str, float] = {}
    phase = None
    row = re.compile(r"(\d\d-[\w.+-]+)\s+(\d+\.\d+)\s*$")
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        m = re.search(r"Target: (\S+)\s*$", line)
        if m:
            phase = m.group(1)
            continue
        if "END PROFILING" in line:
            phase = None
            continue
        m = row.search(line)
        if phase and m:
            phases[phase] = round(phases.get(phase, 0.0) + float(m.group(2)), 1)
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-upstream", action="store_true", help="only time labforge")
    ap.add_argument("--cold-runs", type=int, default=3,
                    help="cold builds of each side, alternating (the median is compared)")
    ap.add_argument("--workdir", help="keep workspaces here (default: a temp dir, removed)")
    args = ap.parse_args()
    setup_logging()
    lb = labmod.load(ROOT / "lab.yaml")
    (ROOT / "cache").mkdir(exist_ok=True)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench-amphora.", dir=ROOT / "cache"))
    base.mkdir(parents=True, exist_ok=True)
    ws = Workspace(base / "labforge")
    cond = Conditions()
    results: dict = {"cold_runs": args.cold_runs, "statistic": "median",
                     "labforge_cold_samples_s": [], "upstream_cold_samples_s": []}
    try:
        # the builder image is shared by both sides: make it first, untimed
        cli = docker_engine.client(ws)
        with open(base / "builder.log", "w") as fh, progress("builder image", None, "s") as bar:
            docker_engine.ensure_builder(lb, ws, cli, amphora.settings(lb), fh, bar)
        up_out = base / "upstream-out"
        up_out.mkdir(exist_ok=True)
        sides = ["labforge"] + ([] if args.skip_upstream else ["upstream"])
        for r in range(args.cold_runs):
            for side in (sides if r % 2 == 0 else sides[::-1]):   # alternate who goes first
                cond.quiet()
                if side == "labforge":
                    shutil.rmtree(ws.cache / "amphora", ignore_errors=True)   # cold: empty cache
                    t0 = time.monotonic()
                    amphora.build_amphora(lb, ws, force=True)
                    results["labforge_cold_samples_s"].append(round(time.monotonic() - t0, 1))
                    results["labforge_phases_s"] = dib_phases(
                        ws.artifacts / "logs" / "amphora.log")
                else:
                    up_cache = base / "upstream-cache"
                    subprocess.run(["rm", "-rf", "--one-file-system", str(up_cache)], check=False)
                    up_cache.mkdir()
                    secs = upstream_build(lb, ws, up_cache, up_out)
                    results["upstream_cold_samples_s"].append(round(secs, 1))
                    results["upstream_phases_s"] = dib_phases(
                        ws.artifacts / "logs" / "upstream-amphora.log")
                print(f"cold {side} run {r + 1}: "
                      f"{results[f'{side}_cold_samples_s'][-1]:.1f}s", file=sys.stderr)
        cond.quiet()
        t0 = time.monotonic()
        amphora.build_amphora(lb, ws, force=True)
        results["labforge_warm_forced_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        out = amphora.build_amphora(lb, ws)
        assert out[-1].status == "up to date", out
        results["labforge_up_to_date_s"] = round(time.monotonic() - t0, 3)
    finally:
        if not args.workdir:
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)

    results.update(cond.finish())
    cold = results["labforge_cold_s"] = statistics.median(results["labforge_cold_samples_s"])
    rows = [("labforge cold (empty cache)", cold, 1.0),
            ("labforge --force (warm cache)", results["labforge_warm_forced_s"],
             results["labforge_warm_forced_s"] / cold),
            ("labforge up to date", results["labforge_up_to_date_s"],
             results["labforge_up_to_date_s"] / cold)]
    if results["upstream_cold_samples_s"]:
        up = results["upstream_cold_s"] = statistics.median(results["upstream_cold_samples_s"])
        rows.append(("upstream diskimage-create.sh cold", up, up / cold))
        results["cold_vs_upstream"] = round(cold / up, 3)
    results["warm_vs_cold"] = round(results["labforge_warm_forced_s"] / cold, 3)
    print(f"\namphora builds, medians of {args.cold_runs} alternating cold runs per side; "
          f"{cond.describe()}")
    print(f"{'run':<36} {'seconds':>9} {'x labforge cold':>16}")
    for name, secs, ratio in rows:
        print(f"{name:<36} {secs:>9.1f} {ratio:>16.2f}")
    print(f"cold samples: labforge {results['labforge_cold_samples_s']}, "
          f"upstream {results['upstream_cold_samples_s']}")
    for side in ("labforge", "upstream"):
        if results.get(f"{side}_phases_s"):
            print(f"{side} DIB phases (s, last cold run): " + ", ".join(
                f"{k} {v:.0f}" for k, v in results[f"{side}_phases_s"].items()))
    if "cold_vs_upstream" in results:
        print(f"\nlabforge cold / upstream cold = {results['cold_vs_upstream']:.2f} (target <= 1.0)")
    print(f"labforge warm / labforge cold = {results['warm_vs_cold']:.2f} (target <= 0.60)")
    cond.warn()
    outdir = ROOT / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "amphora.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
