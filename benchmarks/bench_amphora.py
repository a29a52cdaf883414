"""Benchmark: labforge build-amphora vs upstream's diskimage-create.sh.

Runs, on this machine, in one go:

1. labforge cold: ``build_amphora`` into an empty workspace (empty DIB cache;
   the builder image is built first and not timed, both sides use it);
2. labforge forced warm rebuild (``force=True``, cache kept);
3. labforge "up to date";
4. upstream: Octavia's own ``diskimage-create/diskimage-create.sh`` from the
   same sdist, in the same builder image, with an empty cache of its own.
   Upstream's script refuses ``-i debian``; it does honour a full element
   override (``DIB_ELEMENTS``) and ``-d RELEASE``, so it is given exactly
   the element list labforge uses (upstream's list with debian-minimal and
   labforge's two local elements) and bookworm.  The DIB environment is the
   same (mirrors, local sources, CA), minus labforge's bootstrap tarball
   cache and package layer, which upstream's script does not set.

Prints a table with ratios and writes benchmarks/results/amphora.json.

    .venv/bin/python benchmarks/bench_amphora.py [--skip-upstream]
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-upstream", action="store_true", help="only time labforge")
    ap.add_argument("--workdir", help="keep workspaces here (default: a temp dir, removed)")
    ap.add_argument("--cold-side-by-side", action="store_true",
                    help="only the two cold builds, run at the same time, so a shared machine's "
                         "load weighs on both alike")
    args = ap.parse_args()
    setup_logging()
    lb = labmod.load(ROOT / "lab.yaml")
    (ROOT / "cache").mkdir(exist_ok=True)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench-amphora.", dir=ROOT / "cache"))
    base.mkdir(parents=True, exist_ok=True)
    ws = Workspace(base / "labforge")
    results: dict[str, float] = {}
    try:
        # the builder image is shared by both sides: make it first, untimed
        cli = docker_engine.client(ws)
        with open(base / "builder.log", "w") as fh, progress("builder image", None, "s") as bar:
            docker_engine.ensure_builder(lb, ws, cli, amphora.settings(lb), fh, bar)
        shutil.rmtree(ws.cache / "amphora", ignore_errors=True)
        if args.cold_side_by_side:
            import threading
            up_cache, up_out = base / "upstream-cache", base / "upstream-out"
            up_cache.mkdir(exist_ok=True)
            up_out.mkdir(exist_ok=True)

            def up():
                results["upstream_cold_s"] = upstream_build(lb, Workspace(base / "upstream"), up_cache, up_out)
            th = threading.Thread(target=up)
            th.start()
            t0 = time.monotonic()
            amphora.build_amphora(lb, ws)
            results["labforge_cold_s"] = time.monotonic() - t0
            th.join()
            print(json.dumps(results, indent=2))
            outdir = ROOT / "benchmarks" / "results"
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / "amphora-side-by-side.json").write_text(json.dumps(results, indent=2) + "\n")
            return
        t0 = time.monotonic()
        amphora.build_amphora(lb, ws)
        results["labforge_cold_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        amphora.build_amphora(lb, ws, force=True)
        results["labforge_warm_forced_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        out = amphora.build_amphora(lb, ws)
        assert out[-1].status == "up to date", out
        results["labforge_up_to_date_s"] = time.monotonic() - t0
        if not args.skip_upstream:
            up_cache = base / "upstream-cache"
            up_out = base / "upstream-out"
            up_cache.mkdir(exist_ok=True)
            up_out.mkdir(exist_ok=True)
            results["upstream_cold_s"] = upstream_build(lb, ws, up_cache, up_out)
    finally:
        if not args.workdir:
            import subprocess
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)

    cold = results["labforge_cold_s"]
    rows = [("labforge cold (empty cache)", cold, 1.0),
            ("labforge --force (warm cache)", results["labforge_warm_forced_s"],
             results["labforge_warm_forced_s"] / cold),
            ("labforge up to date", results["labforge_up_to_date_s"],
             results["labforge_up_to_date_s"] / cold)]
    if "upstream_cold_s" in results:
        rows.append(("upstream diskimage-create.sh cold", results["upstream_cold_s"],
                     results["upstream_cold_s"] / cold))
        results["cold_vs_upstream"] = cold / results["upstream_cold_s"]
    results["warm_vs_cold"] = results["labforge_warm_forced_s"] / cold
    print(f"\n{'run':<36} {'seconds':>9} {'x labforge cold':>16}")
    for name, secs, ratio in rows:
        print(f"{name:<36} {secs:>9.1f} {ratio:>16.2f}")
    if "cold_vs_upstream" in results:
        print(f"\nlabforge cold / upstream cold = {results['cold_vs_upstream']:.2f} (target <= 1.0)")
    print(f"labforge warm / labforge cold = {results['warm_vs_cold']:.2f} (target <= 0.60)")
    outdir = ROOT / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "amphora.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
