"""The builder contract: a kind that exists only in this file gets locking,
up-to-date checks, staged atomic writes, manifest records and `invoke all`
reporting from the one runner, with no change outside the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jsonschema
import pytest

from builders import pipeline
from builders.core.contract import Builder, Built, Output, run
from builders.core.errors import LabError
from builders.core.manifest import Manifest, SecretLedger
from helpers import ROOT

SCHEMA = json.loads((ROOT / "builders" / "schemas" / "run.schema.json").read_text())


class Greeting(Builder):
    """A toy kind: one small text file per host."""

    name = "greeting"
    kind = "greeting"
    help = "a greeting per host"

    def __init__(self, fail_on: str | None = None, secret: bool = False):
        self.fail_on = fail_on
        self.secret = secret
        self.builds = 0

    def outputs(self, lab, ws, **_):
        base = ws.certs / "greeting" if self.secret else ws.artifacts / "greeting"
        return [Output(base / f"{h.name}.txt", self.kind, f"greeting {h.name}",
                       inputs=(h.name, str(h.ip)), ledger="secret" if self.secret else "manifest",
                       mode=0o600 if self.secret else 0o644, data=h)
                for h in lab.hosts]

    def build(self, ctx, out, stage):
        self.builds += 1
        if out.data.name == self.fail_on:
            raise LabError(f"greeting {out.data.name}: refused")
        stage.write(out.path, f"hello {out.data.name} at {out.data.ip}\n", out.mode)
        return Built(detail="said hello", meta={"host": out.data.name})


class Reply(Builder):
    """A toy kind that consumes the greetings."""

    name = "reply"
    kind = "reply"
    needs = ("greeting",)

    def outputs(self, lab, ws, **_):
        return [Output(ws.artifacts / "reply.txt", self.kind, "reply",
                       inputs=(tuple(h.name for h in lab.hosts),))]

    def build(self, ctx, out, stage):
        stage.write(out.path, "thanks\n")
        return Built()


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_new_kind_is_built_recorded_and_then_up_to_date(default_lab, ws):
    toy = Greeting()
    first = run(toy, default_lab, ws)
    hosts = [h.name for h in default_lab.hosts]
    assert [(o.step, o.status) for o in first] == [(f"greeting {h}", "built") for h in hosts]
    entries = Manifest(ws.artifacts).entries()
    for h in hosts:
        rec = entries[f"greeting/{h}.txt"]
        assert rec["kind"] == "greeting" and rec["meta"] == {"host": h}
        assert (ws.artifacts / "greeting" / f"{h}.txt").read_text().startswith(f"hello {h}")
    assert not [p for p in (ws.artifacts / "greeting").iterdir() if p.name.startswith(".")]

    before = _tree(ws.artifacts)
    again = run(toy, default_lab, ws)
    assert {o.status for o in again} == {"up to date"}
    assert toy.builds == len(hosts)                  # nothing was built the second time
    assert _tree(ws.artifacts) == before             # not even an mtime moved

    (ws.artifacts / "greeting" / f"{hosts[0]}.txt").write_text("tampered\n")
    healed = run(toy, default_lab, ws)
    assert [o.status for o in healed] == ["built"] + ["up to date"] * (len(hosts) - 1)


def test_a_failing_output_leaves_nothing_written(default_lab, ws):
    last = default_lab.hosts[-1].name
    with pytest.raises(LabError, match="refused"):
        run(Greeting(fail_on=last), default_lab, ws)
    greeting = ws.artifacts / "greeting"
    assert not greeting.exists() or not list(greeting.iterdir())   # not even the earlier hosts
    assert not Manifest(ws.artifacts).path.exists() or not Manifest(ws.artifacts).entries()


def test_secret_outputs_go_to_their_own_ledger_not_the_manifest(default_lab, ws):
    run(Greeting(secret=True), default_lab, ws)
    ledger = SecretLedger(ws.certs / "greeting")
    assert set(ledger.entries()) == {f"{h.name}.txt" for h in default_lab.hosts}
    assert ledger.path.stat().st_mode & 0o777 == 0o600
    assert all((ws.certs / "greeting" / f"{h.name}.txt").stat().st_mode & 0o777 == 0o600
               for h in default_lab.hosts)
    assert not Manifest(ws.artifacts).path.exists() or not Manifest(ws.artifacts).entries()
    assert {o.status for o in run(Greeting(secret=True), default_lab, ws)} == {"up to date"}


def test_a_second_build_on_the_workspace_is_refused(default_lab, ws):
    ws.artifacts.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(ws.artifacts / ".lock"), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # until flock(1) holds the lock
            probe = subprocess.run(["flock", "-n", str(ws.artifacts / ".lock"), "true"])
            if probe.returncode != 0:
                break
            time.sleep(0.05)
        with pytest.raises(LabError, match="another build is running"):
            run(Greeting(), default_lab, ws)
    finally:
        holder.kill()
        holder.wait()
    assert not (ws.artifacts / "greeting").exists()


def test_invoke_all_reports_a_new_kind(default_lab, ws):
    steps = (Greeting(), Reply())
    reports = pipeline.run_all(default_lab, ws, steps=steps)
    assert [(r.name, r.status) for r in reports] == [("greeting", "built"), ("reply", "built")]
    doc = pipeline.to_json(default_lab, ws, reports, steps)
    jsonschema.validate(doc, SCHEMA)
    assert {a["path"]: a["status"] for a in doc["artifacts"]}["reply.txt"] == "built"
    table = pipeline.summary_table(reports)
    assert "greeting" in table and "reply" in table

    again = pipeline.run_all(default_lab, ws, steps=steps)
    assert {r.status for r in again} == {"up to date"}


def test_a_left_out_step_is_ready_from_its_declared_outputs(default_lab, ws):
    steps = (Greeting(), Reply())
    blocked = pipeline.run_all(default_lab, ws, steps=steps, skip=("greeting",))
    assert blocked[1].status == "skipped"
    assert "needs greeting (--skip)" in blocked[1].detail and "has no record" in blocked[1].detail

    run(Greeting(), default_lab, ws)
    ok = pipeline.run_all(default_lab, ws, steps=steps, skip=("greeting",))
    assert [r.status for r in ok] == ["skipped", "built"]

    os.unlink(ws.artifacts / "greeting" / f"{default_lab.hosts[0].name}.txt")
    gone = pipeline.run_all(default_lab, ws, steps=steps, only=("reply",), force=True)
    assert gone[1].status == "skipped" and "missing" in gone[1].detail


def test_unknown_steps_are_named_from_the_steps_in_use(default_lab, ws):
    with pytest.raises(LabError, match="steps are greeting, reply"):
        pipeline.run_all(default_lab, ws, steps=(Greeting(), Reply()), only=("overlays",))


def test_the_pipeline_names_each_step_as_the_step_does():
    """pipeline.KINDS (known without importing any builder) are the steps' own names."""
    assert tuple(s.name for s in pipeline.all_steps()) == pipeline.KINDS


def test_a_single_task_imports_only_its_builder():
    """`labforge certs` does not pay for importing every builder."""
    code = ("import sys, builders.cli, builders.artifacts.certs; "
            "print(sorted(m for m in sys.modules if m.startswith('builders.')))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout
    for heavy in ("builders.artifacts.amphora", "builders.artifacts.vagrant",
                  "builders.publishers.glance", "builders.tools.dib"):
        assert heavy not in mods, heavy


def test_every_contract_step_declares_what_it_records(default_lab, ws):
    """Name drift between a step's declared outputs and what it records fails here:
    the pipeline's readiness of a left-out step is read from the declaration."""
    for step in pipeline.STEPS:
        if isinstance(step, Builder) and type(step).outputs is not Builder.outputs:
            assert step.name and step.kind and step.help, step
            assert set(step.needs) <= set(pipeline.KINDS), step.name
