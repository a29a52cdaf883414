"""Benchmark: labforge glance-upload vs `openstack image create --file`.

Starts a real Keystone + Glance on 127.0.0.1 (tests/openstack_services.py),
makes images of 500 MB and 1.5 GB (random data, so nothing compresses or
skips), then uploads each, alternating, with

  * labforge  `labforge glance-upload` with the default method (auto: a direct
    upload; streamed, sha512 hashed by a reader thread ahead of the sender,
    verified against Glance's os_hash_value),
  * (with --glance-direct) `labforge glance-upload --method glance-direct`,
  * python-openstackclient `openstack image create --file` (direct upload),

each as a child process under /usr/bin/time -v (peak RSS of the child).
Credentials reach both through the same clouds.yaml (never argv).  Prints a
table and writes benchmarks/results/glance.json.

    .venv/bin/python benchmarks/bench_glance.py [--size-mb 500,1500] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the test suite's Keystone + Glance; its modules import each other as pytest does
sys.path.insert(0, str(ROOT / "tests"))

from conditions import Conditions  # noqa: E402
from openstack_services import VENV, OpenStackServices  # noqa: E402


def timed(argv: list[str], env: dict) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (KiB) and CPU seconds of a child, via GNU time -v."""
    t0 = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(argv[:3])} failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)",
                                           proc.stderr))
    return wall, int(m.group(1)) if m else -1, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", default="500,1500", help="image sizes, comma-separated (MB)")
    ap.add_argument("--runs", type=int, default=3, help="uploads per tool and size (median kept)")
    ap.add_argument("--glance-direct", action="store_true",
                    help="also time `--method glance-direct` (staged + imported: Glance writes twice)")
    args = ap.parse_args()
    sizes = [int(x) for x in str(args.size_mb).split(",") if x]
    # as installed: pip byte-compiles a package
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builders")],
                   check=True, capture_output=True)
    script = Path(sys.executable).parent / "labforge"
    labforge = [str(script)] if script.is_file() else [sys.executable, "-m", "invoke", "-r", str(ROOT)]
    cond = Conditions()
    results: dict = {"runs": args.runs, "statistic": "median", "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-glance-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        with OpenStackServices(tmp / "openstack", tls=False) as svc:   # measure the tools, not TLS
            print(f"Keystone + Glance up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            clouds = svc.write_clouds_yaml(tmp / "clouds.yaml", {"bench": svc.cloud_config()})
            env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
            env.update(OS_CLIENT_CONFIG_FILE=str(clouds), LABFORGE_WORKDIR=str(tmp / "ws"))
            conn = svc.admin_connection(project="service")
            for size_mb in sizes:
                results["sizes"][str(size_mb)] = upload_all(
                    tmp, size_mb, args, labforge, env, conn, cond)
            conn.close()
    results.update(cond.finish())
    print(f"\nGlance upload to a local Glance (uWSGI, file store); medians of {args.runs} "
          f"alternating runs; {cond.describe()}")
    print(f"{'size':>6} {'tool':<26}{'seconds':>9}{'MB/s':>8}{'vs CLI':>8}{'peak RSS MiB':>14}"
          f"{'client CPU s':>14}")
    for size_mb, tools in results["sizes"].items():
        base = tools["openstack image create"]
        for label, r in tools.items():
            ratio = r["mb_per_s"] / base["mb_per_s"]
            r["throughput_vs_cli"] = round(ratio, 3)
            print(f"{size_mb:>6} {label:<26}{r['seconds']:>9.1f}{r['mb_per_s']:>8.0f}{ratio:>7.2f}x"
                  f"{r['peak_rss_mib']:>14.0f}{r['client_cpu_s']:>14.1f}")
    print("targets: labforge >= 1.0x the CLI's throughput at every size, peak RSS < 100 MiB")
    cond.warn()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "glance.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {out / 'glance.json'}")


def upload_all(tmp: Path, size_mb: int, args, labforge: list[str], env: dict, conn,
               cond: Conditions) -> dict:
    """Each tool uploads a ``size_mb`` image of random data ``args.runs``
    times, alternating; the median run of each tool."""
    import statistics
    image = tmp / f"bench-{size_mb}.raw"
    with open(image, "wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1 << 20))
        os.fsync(fh.fileno())
    size = image.stat().st_size
    print(f"image: {size / 1e6:.0f} MB of random data", file=sys.stderr)
    tools = {
        "labforge auto (default)": lambda n: [
            *labforge, "glance-upload", "--image", str(image), "--name", n, "--cloud", "bench",
            "--disk-format", "raw"],
        "openstack image create": lambda n: [
            str(VENV / "bin" / "openstack"), "--os-cloud", "bench", "image", "create",
            "--disk-format", "raw", "--container-format", "bare", "--file", str(image), n],
    }
    if args.glance_direct:
        tools["labforge glance-direct"] = lambda n: [
            *labforge, "glance-upload", "--image", str(image), "--name", n, "--cloud", "bench",
            "--method", "glance-direct", "--disk-format", "raw"]
    samples: dict[str, list[tuple]] = {label: [] for label in tools}
    order = list(tools)
    for run in range(args.runs):
        # alternate the order so no tool always pays for the previous one's writeback
        for label in (order if run % 2 == 0 else order[::-1]):
            name = f"bench-{label.replace(' ', '-')}-{size_mb}-{run}"
            os.sync()
            cond.quiet()                   # nobody else busy, Glance included
            wall, rss, cpu = timed(tools[label](name), env)
            img = next(i for i in conn.image.images() if i.name == name)
            assert img.status == "active" and img.size == size, (img.status, img.size)
            conn.image.delete_image(img)   # keep the store small
            samples[label].append((wall, rss, cpu))
            print(f"{size_mb} MB {label}: {wall:.1f}s, peak RSS {rss / 1024:.0f} MiB, client CPU "
                  f"{cpu:.1f}s", file=sys.stderr)
    image.unlink()
    out = {}
    for label in order:
        wall = statistics.median(w for w, _, _ in samples[label])
        out[label] = {"seconds": wall, "mb_per_s": size / 1e6 / wall,
                      "peak_rss_mib": max(r for _, r, _ in samples[label]) / 1024,
                      "client_cpu_s": statistics.median(c for _, _, c in samples[label]),
                      "samples_s": [round(w, 2) for w, _, _ in samples[label]]}
    return out


if __name__ == "__main__":
    main()
