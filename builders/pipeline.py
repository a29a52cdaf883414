"""`invoke all`: every build step of a lab, in dependency order.

Each step is a builder entry point; the pipeline only sequences them,
decides what to skip (and says why), times them, and reports.  Steps whose
inputs did not change are "up to date" by the builders' own manifest
checks, so a second run does nothing.  A failed step (whatever it raised)
marks the steps that depend on it as skipped; independent steps still run.
A step the user left out (``--skip``, or not in ``--only``) does not stop
the steps that need it: they use its outputs from an earlier run when those
are present and intact, and are skipped, saying so, when they are not.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace


@dataclass(frozen=True)
class Step:
    name: str                                   # the KIND users name in --only/--skip
    target: str                                 # "module:function" run as fn(lab, ws, force=...)
    needs: tuple[str, ...] = ()                 # steps whose outputs this one consumes
    skip_if: Callable[[Lab, Workspace], str | None] | None = None  # reason to skip, or None
    help: str = ""
    takes_force: bool = True                    # publishers have nothing to force
    # outputs of an earlier run that later steps can use when this one is left
    # out: None when they are present and intact, else what is missing
    ready: Callable[[Lab, Workspace], str | None] | None = None
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
    from builders.tools.docker_engine import client
    try:
        client(ws)  # connects, or starts dockerd when root (as build-amphora would)
    except LabError as exc:
        return f"no Docker engine: {exc}"
    return None


def _glance_skip(lab: Lab, ws: Workspace) -> str | None:
    if lab.glance.cloud or os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL"):
        return None
    return "no cloud configured (set glance.cloud in lab.yaml, OS_CLOUD or OS_AUTH_URL)"


def _intact(ws: Workspace, name: str, kind: str, what: str) -> str | None:
    manifest = Manifest(ws.artifacts)
    try:
        path, rec = manifest.find(name, kinds=(kind,))
    except LabError:
        return f"{manifest.path} has no {what} {name}"
    if not manifest.intact(path, rec):
        return f"artifacts/{manifest.rel(path)} is missing or differs from the manifest"
    return None


def _certs_ready(lab: Lab, ws: Workspace) -> str | None:
    return None if (ws.certs / "state.json").is_file() else f"{ws.certs} has no certificates"


def _seeds_ready(lab: Lab, ws: Workspace) -> str | None:
    from builders.artifacts.seediso import seed_path
    missing = [h.name for h in lab.hosts
               if not any(seed_path(lab, ws, h, fmt=f).is_file() for f in ("iso", "vfat"))]
    return f"there is no seed for {', '.join(missing)}" if missing else None


def _base_ready(lab: Lab, ws: Workspace) -> str | None:
    from builders.artifacts.baseimage import release     # "bookworm" is named debian-12
    try:
        name = release(lab).name
    except LabError as exc:
        return str(exc)
    return _intact(ws, name, "base-image", "base image")


def _amphora_ready(lab: Lab, ws: Workspace) -> str | None:
    return _intact(ws, lab.octavia.image_name, "amphora", "amphora image")


STEPS: tuple[Step, ...] = (
    Step("certs", "artifacts.certs:build_certs", ready=_certs_ready,
         help="Kafka and Octavia PKI under certs/"),
    Step("seed-iso", "artifacts.seediso:build_seed_isos", needs=("certs",), ready=_seeds_ready,
         help="cloud-init seed ISO per host"),
    Step("base-image", "artifacts.baseimage:build_base_image", ready=_base_ready, help="base cloud image"),
    Step("overlays", "artifacts.overlays:build_overlays", needs=("base-image",), help="qcow2 overlay per host"),
    Step("amphora", "artifacts.amphora:build_amphora", skip_if=_amphora_skip, ready=_amphora_ready,
         help="Octavia amphora image"),
    Step("vagrant", "artifacts.vagrant:build_lab_vagrant", needs=("base-image", "seed-iso"),
         help="Vagrant box of the base image, Vagrantfile, network XML"),
    Step("glance", "publishers.glance:publish_amphora", needs=("amphora",), skip_if=_glance_skip,
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


def _failure(exc: Exception) -> str:
    """One line for a step that raised something other than a LabError."""
    if os.environ.get("LABFORGE_DEBUG"):
        traceback.print_exc(file=sys.stderr)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; fix it and rerun"
    return (f"internal error ({type(exc).__name__}: {exc}); this is a labforge bug: "
            "rerun with LABFORGE_DEBUG=1 and report the traceback")


def _blocked(lab: Lab, ws: Workspace, step: Step, state: dict[str, str]) -> str | None:
    """Why ``step`` cannot run given how the steps it needs ended, or None.

    state[n] is "ran" (built or up to date), "failed", "skipped" (could not
    run: its own reason), or "--skip" / "not in --only" (left out by the user)."""
    for n in step.needs:
        how = state.get(n)
        if how == "failed":
            return f"needs {n}, which failed"
        if how == "skipped":
            return f"needs {n}, which was skipped"
        if how in ("--skip", "not in --only"):
            need = BY_NAME[n]
            missing = need.ready(lab, ws) if need.ready is not None else None
            if missing:
                return f"needs {n} ({how}), but {missing}; build it first"
    return None


def run_all(lab: Lab, ws: Workspace, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (),
            force: bool = False, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Run the lab's steps; never raises for a step's failure (it is reported).

    A step that fails (a LabError, an OSError, a bug) is reported "failed"
    with one line; the steps that need it are skipped; the others run."""
    check_kinds(only, "--only")
    check_kinds(skip, "--skip")
    reports: list[StepReport] = []
    state: dict[str, str] = {}
    with BuildLock(ws):
        for step in STEPS:
            start = time.monotonic()
            rep = _run_step(lab, ws, step, state, only, skip, force)
            rep.seconds = time.monotonic() - start
            reports.append(rep)
            if on_step:
                on_step(rep)
    return reports


def _run_step(lab: Lab, ws: Workspace, step: Step, state: dict[str, str],
              only: tuple[str, ...], skip: tuple[str, ...], force: bool) -> StepReport:
    """Run one step (or say why not) and record how it ended in ``state``."""
    if (only and step.name not in only) or step.name in skip:
        state[step.name] = "--skip" if step.name in skip else "not in --only"
        return StepReport(step.name, "skipped", 0.0, state[step.name])
    try:
        # the step's own reason first: "no cloud configured" says more than
        # "needs amphora" to a user who never meant to publish
        reason = step.skip_if(lab, ws) if step.skip_if is not None else None
        reason = reason or _blocked(lab, ws, step, state)
        if reason:
            state[step.name] = "skipped"
            return StepReport(step.name, "skipped", 0.0, reason)
        outcomes = step.run(lab, ws, force)
        rep = StepReport(step.name, _status(outcomes), 0.0, "", outcomes)
    except LabError as exc:
        rep = StepReport(step.name, "failed", 0.0, str(exc))
    except Exception as exc:  # noqa: BLE001 - an OSError or a bug: still one reported line
        rep = StepReport(step.name, "failed", 0.0, _failure(exc))
    state[step.name] = {"failed": "failed", "skipped": "skipped"}.get(rep.status, "ran")
    return rep


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
