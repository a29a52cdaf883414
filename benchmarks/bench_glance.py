"""Benchmark: labforge glance-upload vs `openstack image create --file`.

Starts a real Keystone + Glance on 127.0.0.1 (tests/openstack_services.py),
makes a ~500 MB image (random data, so nothing compresses or skips), then
uploads it with

  * labforge  `invoke glance-upload` with the default method (auto: a direct
    upload; streamed, sha512 while sending, hash verified against Glance's
    os_hash_value),
  * labforge  `invoke glance-upload --method glance-direct` (staged + imported),
  * python-openstackclient `openstack image create --file` (direct upload),

each as a child process under /usr/bin/time -v (peak RSS of the child).
Credentials reach both through the same clouds.yaml (never argv).  Prints a
table and writes benchmarks/results/glance.json.

    .venv/bin/python benchmarks/bench_glance.py [--size-mb 500] [--runs 1]
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

from tests.openstack_services import VENV, OpenStackServices  # noqa: E402


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
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--runs", type=int, default=2, help="uploads per tool (best time is kept)")
    args = ap.parse_args()

    results: dict = {"size_mb": args.size_mb, "runs": args.runs, "tools": {}}
    with tempfile.TemporaryDirectory(prefix="bench-glance-") as tmp:
        tmp = Path(tmp)
        image = tmp / "bench.raw"
        with open(image, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1 << 20))
            os.fsync(fh.fileno())
        size = image.stat().st_size
        print(f"image: {size / 1e6:.0f} MB of random data", file=sys.stderr)
        t0 = time.monotonic()
        with OpenStackServices(tmp / "openstack", tls=False) as svc:   # measure the tools, not TLS
            print(f"Keystone + Glance up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            clouds = svc.write_clouds_yaml(tmp / "clouds.yaml", {"bench": svc.cloud_config()})
            env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
            env.update(OS_CLIENT_CONFIG_FILE=str(clouds), LABFORGE_WORKDIR=str(tmp / "ws"))
            conn = svc.admin_connection(project="service")
            tools = {
                "labforge auto (default)": lambda n: [
                    sys.executable, "-m", "invoke", "-r", str(ROOT), "glance-upload",
                    "--image", str(image), "--name", n, "--cloud", "bench",
                    "--disk-format", "raw"],
                "labforge glance-direct": lambda n: [
                    sys.executable, "-m", "invoke", "-r", str(ROOT), "glance-upload",
                    "--image", str(image), "--name", n, "--cloud", "bench",
                    "--method", "glance-direct", "--disk-format", "raw"],
                "openstack image create": lambda n: [
                    str(VENV / "bin" / "openstack"), "--os-cloud", "bench", "image", "create",
                    "--disk-format", "raw", "--container-format", "bare", "--file", str(image),
                    n],
            }
            best: dict[str, tuple] = {}
            order = list(tools)
            for run in range(args.runs):
                # alternate the order so no tool always pays for the previous one's writeback
                for label in (order if run % 2 == 0 else order[::-1]):
                    name = f"bench-{label.replace(' ', '-')}-{run}"
                    os.sync()
                    wall, rss, cpu = timed(tools[label](name), env)
                    img = next(i for i in conn.image.images() if i.name == name)
                    assert img.status == "active" and img.size == size, (img.status, img.size)
                    conn.image.delete_image(img)   # keep the store small
                    if label not in best or wall < best[label][0]:
                        best[label] = (wall, rss, cpu)
                    print(f"{label}: {wall:.1f}s, peak RSS {rss / 1024:.0f} MiB, client CPU "
                          f"{cpu:.1f}s", file=sys.stderr)
            for label in order:
                wall, rss, cpu = best[label]
                results["tools"][label] = {"seconds": wall, "mb_per_s": size / 1e6 / wall,
                                           "peak_rss_mib": rss / 1024, "client_cpu_s": cpu}
            conn.close()

    base = results["tools"]["openstack image create"]
    print(f"\nGlance upload of {args.size_mb} MB to a local Glance (uWSGI, file store)")
    print(f"{'tool':<26}{'seconds':>9}{'MB/s':>8}{'vs CLI':>8}{'peak RSS MiB':>14}"
          f"{'client CPU s':>14}")
    for label, r in results["tools"].items():
        ratio = r["mb_per_s"] / base["mb_per_s"]
        r["throughput_vs_cli"] = ratio
        print(f"{label:<26}{r['seconds']:>9.1f}{r['mb_per_s']:>8.0f}{ratio:>7.2f}x"
              f"{r['peak_rss_mib']:>14.0f}{r['client_cpu_s']:>14.1f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "glance.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {out / 'glance.json'}")


if __name__ == "__main__":
    main()
