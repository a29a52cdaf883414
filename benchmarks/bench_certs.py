#!/usr/bin/env python3
"""Benchmark: the full default Kafka certificate set, labforge vs openssl CLI + keytool.

Both sides do the same work on the same machine, in one run:
a CA, three brokers and a client (RSA 2048, SHA-256, SANs, EKUs), and for
each identity PEM cert/key/chain, a PKCS#12 keystore and a JKS keystore,
plus a PKCS#12 and a JKS truststore.

* labforge: `labforge certs` in a fresh process (interpreter start,
  imports and lab.yaml validation included) on a lab with Octavia disabled,
  so only the Kafka set (and the tiny lab SSH key) is made.  labforge's
  modules are byte-compiled first, as a pip install leaves them.
* classic: a bash script calling `openssl` and `keytool` the way the usual
  Kafka TLS guides do (req/x509 per identity, pkcs12 -export, keytool
  -importkeystore for JKS, keytool -importcert for the truststores).

Also measured, in the same run:

* the floor: five RSA-2048 key generations divided by the CPUs, plus the
  interpreter's start (`python -c pass`): no tool making these keys on this
  machine can be faster.  labforge's time over the floor is reported.
* the key generation itself: five keys in series, on a thread pool (what
  labforge does: OpenSSL releases the GIL) and on a process pool.
* labforge's CPU time (user+sys, median) divided by the CPUs: the keys, but
  also the imports, the PKCS#12 encryption and the files, which share the
  same CPUs; no schedule of labforge's work can end sooner than that.
* a Python subset (alternated with the two sides): only the keys, started
  on every CPU right after importing the RSA module, the five certificates
  and their PEM files; no lab.yaml, PKCS#12, JKS or truststores.  Its time
  over the floor is the least a Python tool doing this work reaches here.

Usage:  .venv/bin/python benchmarks/bench_certs.py   (BENCH_ROUNDS=7)
Each side runs BENCH_ROUNDS times, alternating; medians are compared.  A
quiet second before each round labels the figures idle or loaded
(benchmarks/conditions.py).  Prints a
table and writes benchmarks/results/bench_certs.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from conditions import Conditions, cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
KEYS = 5                        # CA, three brokers, client

CLASSIC = r"""
set -euo pipefail
cd "$1"
head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > store.password
PW=store.password
openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 3650 -keyout ca.key -out ca.crt \
  -subj "/O=kafka-lab/CN=kafka-lab Kafka CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
issue() {  # name cn eku san
  local n=$1 cn=$2 eku=$3 san=$4
  openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$n.key" -out "$n.csr" \
    -subj "/O=kafka-lab/CN=$cn" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > "$n.ext"
  openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -sha256 -extfile "$n.ext" -out "$n.crt" 2>/dev/null
  cat "$n.crt" ca.crt > "$n-chain.pem"
  openssl pkcs12 -export -in "$n.crt" -inkey "$n.key" -certfile ca.crt -name "$n" \
    -out "$n.keystore.p12" -passout "file:$PW"
  keytool -importkeystore -noprompt -srckeystore "$n.keystore.p12" -srcstoretype PKCS12 \
    -srcstorepass:file $PW -destkeystore "$n.keystore.jks" -deststoretype JKS \
    -deststorepass:file $PW -destkeypass:file $PW -alias "$n" >/dev/null 2>&1
  rm -f "$n.csr" "$n.ext"
}
for i in 1 2 3; do
  issue "broker$i" "broker$i.lab.internal" serverAuth,clientAuth \
    "DNS:broker$i,DNS:broker$i.lab.internal,IP:192.168.100.1$i,IP:10.100.0.1$i"
done
issue kafka-client kafka-client clientAuth ""
keytool -importcert -noprompt -alias ca -file ca.crt -keystore truststore.jks -storetype JKS \
  -storepass:file $PW >/dev/null 2>&1
keytool -importcert -noprompt -alias ca -file ca.crt -keystore truststore.p12 -storetype PKCS12 \
  -storepass:file $PW >/dev/null 2>&1
"""

# A strict subset of the work, done the fastest way a Python program can:
# the five keys start on the CPUs right after importing the RSA module, before
# anything else is imported; then the CA and four signed certificates (SANs)
# and their PEM files.  No lab.yaml, no PKCS#12, JKS or truststores.  Its time
# over the floor is the least any Python tool doing this work can reach here.
SUBSET = r"""
import os, sys
from concurrent.futures import ThreadPoolExecutor
from cryptography.hazmat.primitives.asymmetric import rsa
pool = ThreadPoolExecutor(os.cpu_count() or 1)
keys = [pool.submit(rsa.generate_private_key, 65537, 2048) for _ in range(5)]
import datetime, ipaddress
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
PEM = serialization.Encoding.PEM
now = datetime.datetime.now(datetime.timezone.utc)
def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
def cert(subject, key, issuer, signer, ca, sans=()):
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=825))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    return b.sign(signer, hashes.SHA256())
def write(path, data):
    with open(os.path.join(sys.argv[1], path), "wb") as f:
        f.write(data)
ca_key = keys[0].result()
ca = cert("ca", ca_key, "ca", ca_key, True)
write("ca.crt", ca.public_bytes(PEM))
for i, n in enumerate(("broker1", "broker2", "broker3", "kafka-client"), 1):
    key = keys[i].result()
    sans = () if i == 4 else (x509.DNSName(n), x509.IPAddress(ipaddress.ip_address(f"10.100.0.1{i}")))
    write(n + ".crt", cert(n, key, "ca", ca_key, False, sans).public_bytes(PEM))
    write(n + ".key", key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
"""

KAFKA_FILES = sorted(
    [f"{n}{s}" for n in ("broker1", "broker2", "broker3", "kafka-client")
     for s in (".crt", ".key", "-chain.pem", ".keystore.p12", ".keystore.jks")]
    + ["ca.crt", "ca.key", "truststore.p12", "truststore.jks", "store.password"])


def timed(argv, cpu: list | None = None, **kw) -> float:
    """Wall seconds of one run; its CPU seconds (user+sys) go to ``cpu``."""
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    secs = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - before)
    if proc.returncode != 0:
        sys.exit(f"bench: {argv[0]} failed: {proc.stderr.strip()[-500:]}")
    return secs


def keytool_summary(store: Path, pw: Path) -> str:
    out = subprocess.run(["keytool", "-list", "-v", "-keystore", store, "-storepass:file", pw],
                         capture_output=True, text=True).stdout
    kinds = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Entry type")]
    chains = [line.split(": ", 1)[1] for line in out.splitlines()
              if line.startswith("Certificate chain length")]
    return f"{','.join(kinds)} chain={','.join(chains) or '-'}"


def _pem_key(_=None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def keygen_ways(rounds: int) -> dict[str, float]:
    """Median seconds for KEYS RSA-2048 keys: in series, on a thread pool, on
    a process pool (pool start included in both)."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    cpus = os.cpu_count() or 1
    ways = {"serial": lambda: [_pem_key() for _ in range(KEYS)]}
    ways["threads"] = lambda: list(ThreadPoolExecutor(cpus).map(_pem_key, range(KEYS)))
    ways["processes"] = lambda: list(ProcessPoolExecutor(cpus).map(_pem_key, range(KEYS)))
    out: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def labforge_command() -> list[str]:
    script = Path(sys.executable).parent / "labforge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "invoke", "-r", str(ROOT)]


def main() -> None:
    for tool in ("openssl", "keytool", "bash"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found; run scripts/setup.sh --test")
    # as installed: pip byte-compiles a package; a checkout under
    # PYTHONDONTWRITEBYTECODE would recompile every module on every run
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builders")],
                   check=True, capture_output=True)
    cond = Conditions()
    work = Path(tempfile.mkdtemp(prefix="bench-certs-"))
    try:
        lab = yaml.safe_load((ROOT / "lab.yaml").read_text())
        lab.setdefault("octavia", {})["enabled"] = False
        lab_file = work / "lab.yaml"
        lab_file.write_text(yaml.safe_dump(lab, sort_keys=False))

        # alternate the two sides a few times (the machine is shared; the
        # median of each side is reported, every sample is in the JSON)
        script = work / "classic.sh"
        script.write_text(CLASSIC)
        subset = work / "subset.py"
        subset.write_text(SUBSET)
        labs, classics, noops, lab_cpu, subsets = [], [], [], [], []
        for r in range(ROUNDS):
            cond.quiet()
            ws = work / f"labforge{r}"
            env = dict(os.environ, LABFORGE_WORKDIR=str(ws))
            cmd = [*labforge_command(), "certs", "--lab", str(lab_file)]
            classic = work / f"classic{r}"
            classic.mkdir()
            part = work / f"subset{r}"
            part.mkdir()
            sides = [("lab", lambda: labs.append(timed(cmd, cpu=lab_cpu, env=env))),
                     ("classic", lambda: classics.append(timed(["bash", str(script), str(classic)]))),
                     ("subset", lambda: subsets.append(timed([sys.executable, str(subset),
                                                              str(part)])))]
            for _, fn in (sides if r % 2 == 0 else sides[::-1]):
                fn()
            noops.append(timed(cmd, env=env))     # labforge, nothing to do
        t_lab, t_classic, t_noop, t_subset = (statistics.median(x)
                                              for x in (labs, classics, noops, subsets))

        # same outputs on both sides
        lk = work / "labforge0" / "certs" / "kafka"
        classic = work / "classic0"
        for d in (lk, classic):
            missing = [f for f in KAFKA_FILES if not (d / f).is_file()]
            if missing:
                sys.exit(f"bench: {d} lacks {missing}")
        checks = {}
        for side, d in (("labforge", lk), ("classic", classic)):
            checks[side] = {n: keytool_summary(d / n, d / "store.password")
                            for n in ("broker1.keystore.p12", "broker1.keystore.jks",
                                      "truststore.p12", "truststore.jks")}
        made = sorted(p.name for p in (work / "subset0").iterdir())
        if len(made) != 9:
            sys.exit(f"bench: the Python subset wrote {made}")
        if checks["labforge"] != checks["classic"]:
            sys.exit(f"bench: outputs differ: {json.dumps(checks, indent=1)}")

        # the floor: key generation spread over the CPUs, plus interpreter start
        keygen = keygen_ways(ROUNDS)
        start = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(ROUNDS))
        floor = keygen["serial"] / (os.cpu_count() or 1) + start
        conditions = cond.finish()

        ratio = t_classic / t_lab
        rows = [("labforge `labforge certs` (fresh process)", t_lab, labs),
                ("openssl CLI + keytool (bash)", t_classic, classics),
                ("labforge second run (up to date)", t_noop, noops),
                ("Python subset: keys first, certs, PEM only", t_subset, subsets)]
        print(f"Kafka certificate set: CA + 3 brokers + client; PEM, PKCS12, JKS, truststores "
              f"(medians of {ROUNDS} alternating runs; {cond.describe()})")
        print(f"{'':<42}{'median s':>9}   samples")
        for name, secs, samples in rows:
            print(f"{name:<42}{secs:>9.3f}   {' '.join(f'{x:.3f}' for x in samples)}")
        print(f"{'speed-up labforge vs classic':<42}{ratio:>7.1f}x  (target >= 5x)")
        print(f"{'floor (keygen / CPUs + python start)':<42}{floor:>9.3f}   "
              f"keygen {keygen['serial']:.3f} s in series, start {start:.3f} s")
        print(f"{'labforge over the floor':<42}{t_lab / floor:>8.2f}x  (target <= 1.3x)")
        print(f"{'Python subset over the floor':<42}{t_subset / floor:>8.2f}x  (the least a "
              "Python tool doing this work reaches here)")
        cpus = os.cpu_count() or 1
        cpu = statistics.median(lab_cpu)
        print(f"{'labforge CPU (user+sys) / CPUs':<42}{cpu / cpus:>9.3f}   {cpu:.3f} s of CPU on "
              f"{cpus} CPUs: no schedule of this work ends sooner ({cpu / cpus / floor:.2f}x "
              "the floor)")
        print(f"{KEYS} keys: in series {keygen['serial']:.3f} s, threads {keygen['threads']:.3f} s, "
              f"processes {keygen['processes']:.3f} s")
        cond.warn()
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {"benchmark": "certs-kafka-set", "labforge_s": round(t_lab, 3),
               "classic_s": round(t_classic, 3), "labforge_noop_s": round(t_noop, 3),
               "samples": {"labforge": labs, "classic": classics, "labforge_noop": noops,
                           "python_subset": subsets},
               "python_subset_s": round(t_subset, 3),
               "python_subset_over_floor": round(t_subset / floor, 2),
               "ratio": round(ratio, 2), "target_ratio": 5,
               "floor_s": round(floor, 3), "over_floor": round(t_lab / floor, 2),
               "target_over_floor": 1.3, "python_start_s": round(start, 4),
               "labforge_cpu_s": round(cpu, 3), "labforge_cpu_per_cpu_s": round(cpu / cpus, 3),
               "keygen_s": {k: round(v, 3) for k, v in keygen.items()}, "keys": KEYS,
               "rounds": ROUNDS, "statistic": "median", **conditions,
               "python": platform.python_version(),
               "keytool_views": checks["labforge"],
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (RESULTS / "bench_certs.json").write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
