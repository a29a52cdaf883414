"""Run every benchmark in turn and write one JSON summary.

    .venv/bin/python benchmarks/run_all.py [--only certs,seediso] [--quick]

Each benchmark is run as its own process (as a user runs it) and writes its
result to benchmarks/results/bench_<name>.json; this script adds the
conditions of the measurement -- the load average before and after, the
number of CPUs, whether another build was running -- and writes everything
to benchmarks/results/summary.json.  A figure taken on a loaded machine is
labelled "loaded": it does not count as meeting a target (targets are
ratios against the classic tool on an idle machine).  Each benchmark labels
its own figures from quiet windows between its rounds (conditions.py); the
load average is kept beside it, but a benchmark's own work raises it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from conditions import IDLE_BUSY, load_per_cpu

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, the JSON it writes under results/, extra arguments for --quick)
BENCHMARKS = {
    "certs": ("bench_certs.py", "bench_certs.json", []),
    "seediso": ("bench_seediso.py", "seediso.json", ["--repeat", "1"]),
    "vagrant": ("bench_vagrant.py", "vagrant.json", []),
    "images": ("bench_images.py", "bench_images.json", ["--skip-build"]),
    "glance": ("bench_glance.py", "glance.json", ["--size-mb", "200", "--runs", "1"]),
    "amphora": ("bench_amphora.py", "amphora.json", ["--skip-upstream", "--cold-runs", "1"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true",
                    help="smaller runs (fewer repeats, no upstream amphora build): a smoke test, "
                         "not figures to quote")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: --only {unknown[0]}: unknown benchmark; choose from "
              f"{', '.join(BENCHMARKS)}", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release()},
               "idle_threshold_busy": IDLE_BUSY, "quick": args.quick,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "benchmarks": {}}
    failed = []
    for name in names:
        script, written, quick_args = BENCHMARKS[name]
        (RESULTS / written).unlink(missing_ok=True)     # no stale figure stands in
        before = load_per_cpu()
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(HERE / script), *(quick_args if args.quick else [])],
                              cwd=HERE.parent)
        after = load_per_cpu()
        entry = {"script": f"benchmarks/{script}", "exit_status": proc.returncode,
                 "wall_seconds": round(time.monotonic() - start, 1),
                 "load_per_cpu_before": round(before, 2), "load_per_cpu_after": round(after, 2),
                 "condition": "failed"}
        result = RESULTS / written
        if proc.returncode == 0 and result.is_file():
            entry["result"] = json.loads(result.read_text())
            # the benchmark's own label; a quick run is a smoke test, never a figure
            entry["condition"] = "quick" if args.quick else entry["result"].get("condition", "loaded")
        else:
            failed.append(name)
        summary["benchmarks"][name] = entry
        print(f"[{name}] exit {proc.returncode}, {entry['wall_seconds']} s, {entry['condition']} "
              f"(load/cpu {before:.2f} -> {after:.2f})", file=sys.stderr)
    out = RESULTS / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
