"""The README's main job on the embedded default lab, end to end, with the
amphora published to a real Keystone + Glance: everything builds, a second
run is up to date everywhere, every artifact verifies, Octavia's tag points
at the new image, and no secret reached artifacts/.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

SCHEMA = json.loads((ROOT / "builders" / "schemas" / "run.schema.json").read_text())


def test_main_job_builds_the_default_lab_and_publishes_the_amphora(main_job, report):
    # both runs are the session's main_job (the Kafka lab test boots its outputs)
    ws, cli, services, first = main_job.ws, main_job.cli, main_job.services, main_job.first
    assert first.returncode == 0, first.stderr[-4000:]
    doc = json.loads(first.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert {s["name"]: s["status"] for s in doc["steps"]} == {
        "certs": "built", "seed-iso": "built", "base-image": "built", "overlays": "built",
        "amphora": "built", "vagrant": "built", "glance": "built"}, first.stderr[-4000:]

    again, wall = main_job.second, main_job.second_wall
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert {s["status"] for s in second["steps"]} == {"up to date"}, again.stderr
    report(f"main job: first run {doc['seconds']:.0f}s ("
          + ", ".join(f"{s['name']} {s['seconds']:.0f}s" for s in doc["steps"])
          + f"); second run {second['seconds']:.2f}s in its steps, {wall:.1f}s for the command")
    assert cli("verify").returncode == 0

    manifest = json.loads((ws.artifacts / "manifest.json").read_text())["artifacts"]
    amphora = manifest["images/amphora-x64-haproxy.qcow2"]
    published = next(iter(amphora["meta"]["glance"].values()))
    conn = services.admin_connection(project="service")
    tagged = [i for i in conn.image.images() if "amphora" in (i.tags or [])]
    assert [i.id for i in tagged] == [published["image_id"]]
    assert tagged[0].status == "active"

    secrets = [p.read_text().strip() for p in ws.certs.rglob("*")
               if p.is_file() and ("password" in p.name or "passphrase" in p.name)]
    assert secrets
    for p in ws.artifacts.rglob("*"):
        if p.is_file() and p.stat().st_size < (64 << 20):
            data = p.read_bytes()
            assert b"PRIVATE KEY" not in data, p
            assert not any(s.encode() in data for s in secrets), p
