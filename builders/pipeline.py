"""`invoke all`: every build step of a lab, in dependency order.

Each step is a builder entry point; the pipeline only sequences them,
decides what to skip (and says why), times them, and reports.  Steps whose
inputs did not change are "up to date" by the builders' own manifest
checks, so a second run does nothing.  A failed step marks the steps that
depend on it as skipped; independent steps still run.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LabError
from .lab import Lab
from .manifest import Manifest
from .outcome import Outcome
from .workspace import BuildLock, Workspace


@dataclass(frozen=True)
class Step:
    name: str                                   # the KIND users name in --only/--skip
    target: str                                 # "module:function" run as fn(lab, ws, force=...)
    needs: tuple[str, ...] = ()                 # steps whose outputs this one consumes
    skip_if: Callable[[Lab, Workspace], str | None] | None = None  # reason to skip, or None
    help: str = ""
    takes_force: bool = True                    # publishers have nothing to force
    publishes: bool = False                     # consumes artifacts, produces none

    def run(self, lab: Lab, ws: Workspace, force: bool) -> list[Outcome]:
        module, func = self.target.split(":")
        fn = getattr(importlib.import_module(f"builders.{module}"), func)
        result = fn(lab, ws, force=force) if self.takes_force else fn(lab, ws)
        return list(result) if isinstance(result, (list, tuple)) else [result]


def _amphora_skip(lab: Lab, ws: Workspace) -> str | None:
    if not lab.octavia.enabled:
        return "lab.yaml octavia.enabled is false"
    if not lab.octavia.amphora.build:
        return "lab.yaml octavia.amphora.build is false"
    from .docker_engine import client
    try:
        client(ws)  # connects, or starts dockerd when root (as build-amphora would)
    except LabError as exc:
        return f"no Docker engine: {exc}"
    return None


def _glance_skip(lab: Lab, ws: Workspace) -> str | None:
    if lab.glance.cloud or os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL"):
        return None
    return "no cloud configured (set glance.cloud in lab.yaml, OS_CLOUD or OS_AUTH_URL)"


STEPS: tuple[Step, ...] = (
    Step("certs", "certs:build_certs", help="Kafka and Octavia PKI under certs/"),
    Step("seed-iso", "seediso:build_seed_isos", needs=("certs",), help="cloud-init seed ISO per host"),
    Step("base-image", "baseimage:build_base_image", help="base cloud image"),
    Step("overlays", "overlays:build_overlays", needs=("base-image",), help="qcow2 overlay per host"),
    Step("amphora", "amphora:build_amphora", skip_if=_amphora_skip, help="Octavia amphora image"),
    Step("vagrant", "vagrant:build_lab_vagrant", needs=("base-image", "seed-iso"),
         help="Vagrant box of the base image, Vagrantfile, network XML"),
    Step("glance", "glance:publish_amphora", needs=("amphora",), skip_if=_glance_skip,
         takes_force=False, publishes=True, help="publish the amphora to Glance, tagged"),
)
BY_NAME = {s.name: s for s in STEPS}
KINDS = tuple(s.name for s in STEPS)


@dataclass
class StepReport:
    name: str
    status: str                                  # built | up to date | skipped | failed
    seconds: float
    detail: str = ""
    outcomes: list[Outcome] = field(default_factory=list)


def _status(outcomes: list[Outcome]) -> str:
    statuses = {o.status for o in outcomes}
    for s in ("failed", "built", "up to date"):
        if s in statuses:
            return s
    return "skipped" if statuses else "up to date"


def check_kinds(values: tuple[str, ...], option: str) -> None:
    for v in values:
        if v not in KINDS:
            raise LabError(f"{option} {v}: unknown step; steps are {', '.join(KINDS)}")


def run_all(lab: Lab, ws: Workspace, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (),
            force: bool = False, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Run the lab's steps; never raises for a step's failure (it is reported)."""
    check_kinds(only, "--only")
    check_kinds(skip, "--skip")
    reports: list[StepReport] = []
    bad: set[str] = set()
    with BuildLock(ws):
        for step in STEPS:
            start = time.monotonic()
            reason = None
            if only and step.name not in only:
                reason = "not in --only"
            elif step.name in skip:
                reason = "--skip"
            elif any(n in bad for n in step.needs):
                reason = f"needs {', '.join(n for n in step.needs if n in bad)}, which did not build"
            elif step.skip_if is not None:
                reason = step.skip_if(lab, ws)
            if reason:
                rep = StepReport(step.name, "skipped", 0.0, reason)
                if not reason.startswith("not in --only") and reason != "--skip":
                    bad.add(step.name)
            else:
                try:
                    outcomes = step.run(lab, ws, force)
                    rep = StepReport(step.name, _status(outcomes), 0.0, "", outcomes)
                except LabError as exc:
                    rep = StepReport(step.name, "failed", 0.0, str(exc))
                if rep.status == "failed":
                    bad.add(step.name)
            rep.seconds = time.monotonic() - start
            reports.append(rep)
            if on_step:
                on_step(rep)
    return reports


def to_json(lab: Lab, ws: Workspace, reports: list[StepReport]) -> dict:
    """The machine-readable result (validated by schemas/run.schema.json)."""
    manifest = Manifest(ws.artifacts)
    entries = manifest.entries() if manifest.path.exists() else {}
    # an artifact's status is what the step that produced it did: publishers
    # (glance) name the artifact they consumed and do not change it; within
    # the producing step the strongest status wins (built over up to date)
    rank = {"failed": 3, "built": 2, "up to date": 1, "skipped": 0}
    outcome_status: dict[str, str] = {}
    for r in reports:
        if BY_NAME[r.name].publishes:
            continue
        for o in r.outcomes:
            for p in o.paths:
                try:
                    rel = manifest.rel(Path(p))
                except LabError:
                    continue  # outputs outside artifacts/ (certs) are not published
                if rank.get(o.status, -1) > rank.get(outcome_status.get(rel, ""), -1):
                    outcome_status[rel] = o.status
    return {
        "lab": lab.name,
        "lab_file": str(lab.source),
        "workdir": str(ws.root),
        "ok": not any(r.status == "failed" for r in reports),
        "seconds": round(sum(r.seconds for r in reports), 3),
        "steps": [{
            "name": r.name, "status": r.status, "seconds": round(r.seconds, 3),
            "detail": r.detail,
            "outcomes": [{"step": o.step, "status": o.status, "detail": o.detail}
                         for o in r.outcomes],
        } for r in reports],
        "artifacts": [{
            "path": rel, "kind": rec["kind"], "sha256": rec["sha256"], "size": rec["size"],
            "status": outcome_status.get(rel, "unchanged"),
        } for rel, rec in sorted(entries.items())],
    }


def summary_table(reports: list[StepReport]) -> str:
    width = max(len(r.name) for r in reports) if reports else 4
    lines = [f"{'step':<{width}}  {'status':<10}  {'time':>7}  detail"]
    for r in reports:
        lines.append(f"{r.name:<{width}}  {r.status:<10}  {r.seconds:>6.1f}s  {r.detail}")
    total = sum(r.seconds for r in reports)
    lines.append(f"{'total':<{width}}  {'':<10}  {total:>6.1f}s")
    return "\n".join(lines)
