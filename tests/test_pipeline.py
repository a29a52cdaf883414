"""`invoke all` end to end on a quick lab: every step but the amphora and
Glance (they have their own slow tests), with the base image downloaded from
a local mirror.  Incremental rebuilds, the JSON result, kill -9 recovery and
the no-secrets-in-artifacts rule are checked here on real outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from helpers import INVOKE, ROOT, lab_file, tree_snapshot
from imagetools import publish_debian

pytestmark = pytest.mark.integration

SCHEMA = json.loads((ROOT / "builders" / "schemas" / "run.schema.json").read_text())
QUICK = ["--skip", "amphora", "--skip", "glance"]


@pytest.fixture
def quick_lab(tmp_path, mirror) -> Path:
    publish_debian(mirror.root, data_mib=8)
    return lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})


def run_all(cli, lab: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = cli("all", "--lab", str(lab), "--json", *QUICK, *extra)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    return proc, doc


def statuses(doc: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in doc["steps"]}


def test_all_builds_the_lab_then_everything_is_up_to_date(ws, cli, quick_lab):
    proc, doc = run_all(cli, quick_lab)
    assert statuses(doc) == {"certs": "built", "seed-iso": "built", "base-image": "built",
                             "overlays": "built", "amphora": "skipped", "vagrant": "built",
                             "glance": "skipped"}
    assert doc["ok"] is True
    paths = {a["path"] for a in doc["artifacts"]}
    assert {"images/debian-12.qcow2", "vms/broker3.qcow2"} <= paths
    # the brokers' seeds carry their keystores: secret, under certs/, not published
    assert (ws.certs / "seed" / "broker1.iso").is_file() and "seed/broker1.iso" not in paths
    assert any(p.endswith(".box") for p in paths)
    for a in doc["artifacts"]:
        assert hashlib.sha256((ws.artifacts / a["path"]).read_bytes()).hexdigest() == a["sha256"]
    assert "step" in proc.stderr and "total" in proc.stderr        # the summary table

    again, doc2 = run_all(cli, quick_lab)
    assert {s for n, s in statuses(doc2).items() if n not in ("amphora", "glance")} == {"up to date"}
    assert all(a["status"] in ("up to date", "unchanged") for a in doc2["artifacts"])
    assert cli("verify").returncode == 0


def test_changing_broker2_ip_rebuilds_exactly_broker2(tmp_path, ws, cli, quick_lab):
    run_all(cli, quick_lab)
    certs_before = tree_snapshot(ws.certs, hidden=False)          # kafka, octavia, ssh, seed, state.json
    art_before = tree_snapshot(ws.artifacts, hidden=False)

    data = yaml.safe_load(quick_lab.read_text())
    data["hosts"]["broker2"]["ip"] = "10.100.0.22"
    quick_lab.write_text(yaml.safe_dump(data, sort_keys=False))
    _, doc = run_all(cli, quick_lab)

    certs_after = tree_snapshot(ws.certs, hidden=False)
    assert set(certs_after) == set(certs_before), set(certs_after) ^ set(certs_before)
    changed_certs = {p for p in certs_after if certs_before.get(p) != certs_after[p]}
    # broker2's identity and its files; state.json records its new serial; the
    # (secret) seeds of every broker, whose /etc/hosts lists broker2's address
    seeds = {p for p in changed_certs if p.startswith("seed/")}
    assert {"seed/broker1.iso", "seed/broker2.iso", "seed/broker3.iso"} <= seeds, changed_certs
    assert changed_certs - {"state.json"} - seeds and all(
        p.startswith(("kafka/broker2.", "kafka/broker2-", "kafka/server-broker2"))
        for p in changed_certs - {"state.json"} - seeds), changed_certs
    # every rebuilt outcome across all steps: broker2's certificate (in the
    # kafka set), the seeds and broker2's overlay, and the Vagrantfile, which
    # lists broker2's address; nothing else (octavia and ssh sets, base, box)
    built = {o["step"]: o["detail"] for s in doc["steps"] for o in s["outcomes"]
             if o["status"] == "built"}
    assert set(built) == {"certs kafka", "seed-iso broker1", "seed-iso broker2",
                          "seed-iso broker3", "overlay broker2",
                          "vagrantfile vagrant/Vagrantfile"}, built
    assert "broker2" in built["certs kafka"] and "broker1" not in built["certs kafka"] \
        and "broker3" not in built["certs kafka"], built["certs kafka"]
    assert {s["name"]: s["status"] for s in doc["steps"]} == {
        "certs": "built", "seed-iso": "built", "base-image": "up to date", "overlays": "built",
        "amphora": "skipped", "vagrant": "built", "glance": "skipped"}
    # on disk under artifacts/: the Vagrantfile changed; nothing else did
    art_after = tree_snapshot(ws.artifacts, hidden=False)
    changed = {p for p in art_after if art_before.get(p) != art_after[p]} - {"manifest.json"}
    assert changed == {"vagrant/Vagrantfile"}, changed
    rebuilt = {a["path"] for a in doc["artifacts"] if a["status"] == "built"}
    assert rebuilt == {"vms/broker2.qcow2", "vagrant/Vagrantfile"}, rebuilt


def test_only_seed_iso_builds_just_the_seeds(ws, cli, quick_lab):
    # without certs the seeds cannot be made: a clear skip, nothing written
    proc = cli("all", "--lab", str(quick_lab), "--json", "--only", "seed-iso")
    assert proc.returncode == 0, proc.stderr
    seed = next(s for s in json.loads(proc.stdout)["steps"] if s["name"] == "seed-iso")
    assert seed["status"] == "skipped" and "needs certs (not in --only)" in seed["detail"], seed
    assert not (ws.artifacts / "seed").exists() and not (ws.certs / "seed").exists()

    cli("certs", "--lab", str(quick_lab), check=True)
    _, doc = run_all(cli, quick_lab, "--only", "seed-iso")
    assert statuses(doc) == {"certs": "skipped", "seed-iso": "built", "base-image": "skipped",
                             "overlays": "skipped", "amphora": "skipped", "vagrant": "skipped",
                             "glance": "skipped"}
    # the brokers' seeds carry keystores: secret, in certs/seed/, never in artifacts/
    assert {p.name for p in (ws.certs / "seed").glob("*.iso")} == {
        "broker1.iso", "broker2.iso", "broker3.iso"}
    assert doc["artifacts"] == [] and not (ws.artifacts / "seed").exists()


def test_manifest_prints_it_and_verify_reports_drift(ws, cli, quick_lab):
    run_all(cli, quick_lab)
    shown = cli("manifest", check=True)
    assert json.loads(shown.stdout) == json.loads((ws.artifacts / "manifest.json").read_text())
    n = len(json.loads(shown.stdout)["artifacts"])
    ok = cli("verify", check=True)
    assert f"all {n} artifacts verify" in ok.stdout
    before = (ws.artifacts / "manifest.json").read_bytes()
    seed = ws.artifacts / "vagrant" / "networks" / "private.xml"
    data = bytearray(seed.read_bytes())
    data[-3] ^= 0x01                                      # same size, other content
    seed.write_bytes(bytes(data))
    (ws.artifacts / "vms" / "broker3.qcow2").unlink()
    proc = cli("verify")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert "vagrant/networks/private.xml: sha256 differs from the manifest" in lines, proc.stderr
    assert "vms/broker3.qcow2: missing" in lines, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and f"2 of {n} artifacts drifted" in errors[0], proc.stderr
    assert (ws.artifacts / "manifest.json").read_bytes() == before   # verify only reads


def test_two_runs_at_once_one_is_refused_and_the_tree_stays_valid(ws, cli, tmp_path, mirror):
    """Both runs start together; the local mirror holds the winner's base image
    download halfway, so the runs certainly overlap."""
    import threading
    publish_debian(mirror.root, data_mib=8)
    lab = lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})
    release = threading.Event()
    mirror.hold = release
    env = dict(os.environ, LABFORGE_WORKDIR=str(ws.root))
    argv = [*INVOKE, "all", "--lab", str(lab), "--json", *QUICK]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        assert mirror.held.wait(300), "no run reached the base image download"
        loser = None
        for _ in range(1200):
            loser = next((p for p in procs if p.poll() is not None), None)
            if loser is not None:
                break
            time.sleep(0.05)
        assert loser is not None, "neither run was refused"
        lost_out, lost_err = loser.communicate()
        release.set()
        winner = next(p for p in procs if p is not loser)
        won_out, won_err = winner.communicate(timeout=600)
    finally:
        release.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert loser.returncode == 1, lost_err
    assert lost_err.splitlines() == [
        f"error: {ws.artifacts}: another build is running (pid {winner.pid}); "
        "wait for it to finish or stop it"], lost_err
    assert lost_out == ""
    assert winner.returncode == 0, won_err
    doc = json.loads(won_out)
    jsonschema.validate(doc, SCHEMA)
    assert doc["ok"] and statuses(doc)["base-image"] == "built"
    assert cli("verify").returncode == 0
    assert not [p for p in ws.root.rglob("*.part") if "downloads" not in p.parts]


def test_no_secret_reaches_artifacts_or_the_manifest(ws, cli, quick_lab):
    run_all(cli, quick_lab)
    secrets = []
    for p in ws.certs.rglob("*"):
        if p.is_file() and ("password" in p.name or "passphrase" in p.name or p.name == "heartbeat_key"):
            secrets.append(p.read_text().strip())
    assert len(secrets) >= 2, sorted(str(p) for p in ws.certs.rglob("*"))
    for p in ws.artifacts.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        assert b"PRIVATE KEY" not in data, p
        for s in secrets:
            assert s.encode() not in data, (p, "a generated password")


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_completes(ws, cli, quick_lab):
    seed = int(os.environ.get("LABFORGE_FAULT_SEED", time.time()))
    rng = random.Random(seed)
    env = dict(os.environ, LABFORGE_WORKDIR=str(ws.root))
    for attempt in range(4):
        delay = rng.uniform(0.3, 6.0)
        proc = subprocess.Popen([*INVOKE, "all", "--lab", str(quick_lab), *QUICK, "--force"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done, doc = run_all(cli, quick_lab)
        assert doc["ok"], (seed, delay, done.stderr)
        v = cli("verify")
        assert v.returncode == 0, (f"seed {seed}, kill after {delay:.2f}s", v.stderr)
        manifest = json.loads((ws.artifacts / "manifest.json").read_text())
        assert manifest["artifacts"], "the rerun recorded nothing"
        for rel, rec in manifest["artifacts"].items():
            path = ws.artifacts / rel
            assert path.stat().st_size == rec["size"], (seed, delay, rel)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"], (seed, delay, rel)
        # no temporary file of the killed run is left behind (a resumable
        # download under cache/downloads/ is kept on purpose, by design)
        leftovers = [str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
                     if (p.name.endswith((".part", ".tmp", ".dib")) or ".part." in p.name)
                     and "downloads" not in p.relative_to(ws.root).parts]
        assert not leftovers, (f"seed {seed}, kill after {delay:.2f}s", leftovers)


# ---------------------------------------------------------------------------
# a step that fails with something other than a LabError; --skip / --only
# ---------------------------------------------------------------------------
def run_all_failing(cli, lab: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    proc = cli("all", "--lab", str(lab), "--json", *extra, env=env)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    return proc, doc


def test_an_os_error_in_one_step_is_reported_and_independent_steps_still_run(ws, cli, quick_lab):
    """artifacts/vms is a file, not a directory: the overlays step meets an
    OSError (not a LabError).  The run still reports every step in JSON."""
    ws.artifacts.mkdir(parents=True)
    (ws.artifacts / "vms").write_text("not a directory\n")
    proc, doc = run_all_failing(cli, quick_lab, *QUICK)
    assert proc.returncode == 1, proc.stderr
    assert doc["ok"] is False
    st = statuses(doc)
    assert st == {"certs": "built", "seed-iso": "built", "base-image": "built",
                  "overlays": "failed", "amphora": "skipped", "vagrant": "built",
                  "glance": "skipped"}, st
    overlays = next(s for s in doc["steps"] if s["name"] == "overlays")
    assert "vms" in overlays["detail"] and "\n" not in overlays["detail"], overlays
    assert "fix it and rerun" in overlays["detail"]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: overlays failed; see the lines above"], proc.stderr
    assert "overlays: failed (" in proc.stderr
    # what did build is recorded and intact
    (ws.artifacts / "vms").unlink()
    assert cli("verify").returncode == 0


def test_skipped_step_outputs_are_used_when_present_else_a_clear_skip(ws, cli, quick_lab):
    """--skip / --only leave a step out; the steps that need it use its earlier
    outputs when they are in the manifest and intact, and are skipped with the
    reason when not (instead of failing on the missing input)."""
    from helpers import make_qcow2
    from builders.core.manifest import Manifest
    cloud = {"OS_AUTH_URL": "http://127.0.0.1:9/v3", "OS_USERNAME": "admin", "OS_PASSWORD": "pw",
             "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
             "OS_PROJECT_DOMAIN_NAME": "Default", "OS_CLOUD": ""}
    # no amphora: publishing it is skipped, saying why; the run is ok
    proc = cli("all", "--lab", str(quick_lab), "--json", "--only", "glance", env=cloud)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    glance = next(s for s in doc["steps"] if s["name"] == "glance")
    assert glance["status"] == "skipped", glance
    assert glance["detail"].startswith("needs amphora (not in --only), but ") and \
        "has no record of amphora-x64-haproxy.qcow2" in glance["detail"], glance
    # an existing amphora (built earlier): --skip amphora publishes it, so the
    # glance step runs (and here meets the unreachable Keystone)
    amp = make_qcow2(ws.artifacts / "images" / "amphora-x64-haproxy.qcow2", "64M", data_mib=1)
    Manifest(ws.artifacts).record(amp, "amphora", "built-earlier", meta={"arch": "x86_64"})
    skip_all_but_glance = [a for k in ("certs", "seed-iso", "base-image", "overlays", "vagrant",
                                       "amphora") for a in ("--skip", k)]
    proc, doc = run_all_failing(cli, quick_lab, *skip_all_but_glance, env=cloud)
    glance = next(s for s in doc["steps"] if s["name"] == "glance")
    assert glance["status"] == "failed" and "127.0.0.1:9" in glance["detail"], glance
    assert next(a for a in doc["artifacts"] if a["kind"] == "amphora")["status"] == "unchanged"
    # the amphora on disk no longer matches the manifest: not published
    with open(amp, "ab") as fh:
        fh.write(b"tampered")
    proc = cli("all", "--lab", str(quick_lab), "--json", *skip_all_but_glance, env=cloud)
    assert proc.returncode == 0, proc.stderr
    glance = next(s for s in json.loads(proc.stdout)["steps"] if s["name"] == "glance")
    assert glance["status"] == "skipped" and "differs from manifest.json" in glance["detail"], glance
    # --only overlays on a workspace without a base image: a clear skip too
    proc = cli("all", "--lab", str(quick_lab), "--json", "--only", "overlays")
    assert proc.returncode == 0, proc.stderr
    overlays = next(s for s in json.loads(proc.stdout)["steps"] if s["name"] == "overlays")
    assert overlays["status"] == "skipped" and \
        "needs base-image (not in --only), but" in overlays["detail"], overlays
    assert not (ws.artifacts / "vms").exists()


def test_sigterm_stops_like_ctrl_c_and_a_rerun_completes(ws, cli, tmp_path, mirror):
    """A cancelled CI job gets SIGTERM: the run unwinds like Ctrl-C (one line,
    exit 143, no traceback, nothing half-written under artifacts/), and the
    next run completes, resuming the interrupted download."""
    import threading
    publish_debian(mirror.root, data_mib=8)
    lab = lab_file(tmp_path, base_image={"source": "download", "url": mirror.url})
    release = threading.Event()
    mirror.hold = release
    proc = subprocess.Popen([*INVOKE, "all", "--lab", str(lab), *QUICK],
                            env=dict(os.environ, LABFORGE_WORKDIR=str(ws.root)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert mirror.held.wait(300), "the base image download never started"
        part = ws.cache / "downloads" / "debian-12"
        for _ in range(600):             # the client has written what it got
            if any(p.stat().st_size for p in part.glob("*.part")):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, err)
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: terminated (SIGTERM); partial outputs were removed, "
                      "rerun to continue"], err
    assert not [p for p in ws.artifacts.rglob("*.part")], list(ws.artifacts.rglob("*.part"))
    assert not (ws.artifacts / "images" / "debian-12.qcow2").exists()
    assert cli("verify").returncode == 0                 # what was recorded is intact
    mirror.requests.clear()
    _, doc = run_all(cli, lab)
    assert statuses(doc)["base-image"] == "built"
    assert any(rng for path, rng in mirror.requests if path.endswith(".qcow2")), mirror.requests


def test_artifact_status_comes_from_the_step_that_produced_it(ws, tmp_path):
    """The glance step names the amphora it published; that must not turn the
    amphora's "built" (this run) into the publisher's "up to date"."""
    from helpers import lab_from, make_qcow2
    from builders import pipeline
    from builders.core.manifest import Manifest
    from builders.core.outcome import Outcome
    lab = lab_from(tmp_path)
    amp = make_qcow2(ws.artifacts / "images" / "amphora-x64-haproxy.qcow2", "64M")
    Manifest(ws.artifacts).record(amp, "amphora", "d1")

    def doc(amphora_status: str, glance_status: str) -> dict:
        reports = [pipeline.StepReport("amphora", amphora_status, 1.0, "",
                                       [Outcome("amphora", amphora_status, [amp])]
                                       if amphora_status != "skipped" else []),
                   pipeline.StepReport("glance", glance_status, 1.0, "",
                                       [Outcome("publish-amphora lab", glance_status, [amp])])]
        out = pipeline.to_json(lab, ws, reports)
        jsonschema.validate(out, SCHEMA)
        return {a["path"]: a["status"] for a in out["artifacts"]}

    assert doc("built", "up to date") == {"images/amphora-x64-haproxy.qcow2": "built"}
    assert doc("up to date", "built") == {"images/amphora-x64-haproxy.qcow2": "up to date"}
    # left out (--skip amphora) and published: not rebuilt, so unchanged
    assert doc("skipped", "built") == {"images/amphora-x64-haproxy.qcow2": "unchanged"}


def test_amphora_skip_gives_the_real_reason(ws, tmp_path):
    from helpers import lab_from
    from builders import pipeline
    off = lab_from(tmp_path, filename="off.yaml", octavia={"enabled": False})
    assert pipeline.BY_NAME["amphora"].skip_reason(off, ws) == "lab.yaml octavia.enabled is false"
    nobuild = lab_from(tmp_path, filename="nobuild.yaml", octavia={"amphora": {"build": False}})
    assert pipeline.BY_NAME["amphora"].skip_reason(nobuild, ws) == "lab.yaml octavia.amphora.build is false"


def test_a_step_gives_its_own_skip_reason_before_its_needs(ws, cli, quick_lab):
    """No cloud configured and no amphora: the glance step says the first,
    which is what a user who never meant to publish needs to read."""
    env = {k: "" for k in ("OS_CLOUD", "OS_AUTH_URL")}
    proc = cli("all", "--lab", str(quick_lab), "--json", "--only", "glance", env=env)
    assert proc.returncode == 0, proc.stderr
    glance = next(s for s in json.loads(proc.stdout)["steps"] if s["name"] == "glance")
    assert glance["status"] == "skipped" and glance["detail"].startswith("no cloud configured"), glance
