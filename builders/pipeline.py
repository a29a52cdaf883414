"""`invoke all`: every build step of a lab, in dependency order.

Each step is a builder or publisher object (builders.core.contract),
imported here directly; the pipeline only sequences them, decides what to
skip (and says why), times them, and reports.  Builders run through the
contract's one runner, so outputs whose inputs did not change are "up to
date" and a second run does nothing.  What a left-out step has ready comes
from that builder's declared outputs (``Builder.ready``).  A failed step (whatever it raised)
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

from builders.core import contract
from builders.core.contract import Builder, Publisher
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace


Step = Builder | Publisher      # a pipeline step: it has name, help, needs, skip_reason


def run_step(step: Step, lab: Lab, ws: Workspace, force: bool) -> list[Outcome]:
    """One step's outcomes: a builder through the contract's runner, a publisher as it publishes."""
    if isinstance(step, Publisher):
        return list(step.publish(lab, ws))
    return contract.run(step, lab, ws, force=force)


# Every step in dependency order: its name and the object that is it.  The
# objects are imported on first use (:func:`all_steps`), so that a single task
# (`labforge certs`) does not import every builder; a test checks that each
# object's name is the one given here.
HOMES: tuple[tuple[str, str, str], ...] = (
    ("certs", "builders.artifacts.certs", "CERTS"),
    ("seed-iso", "builders.artifacts.seed", "SEEDS"),
    ("base-image", "builders.artifacts.baseimage", "BASE_IMAGE"),
    ("overlays", "builders.artifacts.overlays", "OVERLAYS"),
    ("amphora", "builders.artifacts.amphora", "AMPHORA"),
    ("vagrant", "builders.artifacts.vagrant", "VAGRANT"),
    ("glance", "builders.publishers.glance", "GLANCE"),
)
KINDS = tuple(name for name, _, _ in HOMES)


def all_steps() -> tuple[Step, ...]:
    """The pipeline's steps (builder and publisher objects), in order."""
    return tuple(getattr(importlib.import_module(module), attr) for _, module, attr in HOMES)


def __getattr__(name: str):
    """``pipeline.STEPS`` and ``pipeline.BY_NAME``, made on first use."""
    if name == "STEPS":
        return all_steps()
    if name == "BY_NAME":
        return {s.name: s for s in all_steps()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def check_kinds(values: tuple[str, ...], option: str, steps: tuple[Step, ...] | None = None
                ) -> None:
    names = [s.name for s in steps] if steps is not None else list(KINDS)
    for v in values:
        if v not in names:
            raise LabError(f"{option} {v}: unknown step; steps are {', '.join(names)}")


def _failure(exc: Exception) -> str:
    """One line for a step that raised something other than a LabError."""
    if os.environ.get("LABFORGE_DEBUG"):
        traceback.print_exc(file=sys.stderr)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; fix it and rerun"
    return (f"internal error ({type(exc).__name__}: {exc}); this is a labforge bug: "
            "rerun with LABFORGE_DEBUG=1 and report the traceback")


def _blocked(lab: Lab, ws: Workspace, step: Step, state: dict[str, str],
             by_name: dict[str, Step]) -> str | None:
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
            need = by_name[n]
            missing = need.ready(lab, ws) if isinstance(need, Builder) else None
            if missing:
                return f"needs {n} ({how}), but {missing}; build it first"
    return None


def run_all(lab: Lab, ws: Workspace, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = (),
            force: bool = False, on_step: Callable[[StepReport], None] | None = None,
            steps: tuple[Step, ...] | None = None) -> list[StepReport]:
    """Run the lab's steps (default: :func:`all_steps`, in order); never raises
    for a step's failure (it is reported).

    A step that fails (a LabError, an OSError, a bug) is reported "failed"
    with one line; the steps that need it are skipped; the others run."""
    steps = all_steps() if steps is None else steps
    check_kinds(only, "--only", steps)
    check_kinds(skip, "--skip", steps)
    by_name = {s.name: s for s in steps}
    reports: list[StepReport] = []
    state: dict[str, str] = {}
    with BuildLock(ws):
        for step in steps:
            start = time.monotonic()
            rep = _run_step(lab, ws, step, state, only, skip, force, by_name)
            rep.seconds = time.monotonic() - start
            reports.append(rep)
            if on_step:
                on_step(rep)
    return reports


def _run_step(lab: Lab, ws: Workspace, step: Step, state: dict[str, str],
              only: tuple[str, ...], skip: tuple[str, ...], force: bool,
              by_name: dict[str, Step]) -> StepReport:
    """Run one step (or say why not) and record how it ended in ``state``."""
    if (only and step.name not in only) or step.name in skip:
        state[step.name] = "--skip" if step.name in skip else "not in --only"
        return StepReport(step.name, "skipped", 0.0, state[step.name])
    try:
        # the step's own reason first: "no cloud configured" says more than
        # "needs amphora" to a user who never meant to publish
        reason = step.skip_reason(lab, ws) or _blocked(lab, ws, step, state, by_name)
        if reason:
            state[step.name] = "skipped"
            return StepReport(step.name, "skipped", 0.0, reason)
        outcomes = run_step(step, lab, ws, force)
        rep = StepReport(step.name, _status(outcomes), 0.0, "", outcomes)
    except LabError as exc:
        rep = StepReport(step.name, "failed", 0.0, str(exc))
    except Exception as exc:  # noqa: BLE001 - an OSError or a bug: still one reported line
        rep = StepReport(step.name, "failed", 0.0, _failure(exc))
    state[step.name] = {"failed": "failed", "skipped": "skipped"}.get(rep.status, "ran")
    return rep


def to_json(lab: Lab, ws: Workspace, reports: list[StepReport],
            steps: tuple[Step, ...] | None = None) -> dict:
    """The machine-readable result (validated by schemas/run.schema.json)."""
    steps = all_steps() if steps is None else steps
    manifest = Manifest(ws.artifacts)
    entries = manifest.entries() if manifest.path.exists() else {}
    # an artifact's status is what the step that produced it did: publishers
    # (glance) name the artifact they consumed and do not change it; within
    # the producing step the strongest status wins (built over up to date)
    publishers = {s.name for s in steps if isinstance(s, Publisher)}
    rank = {"failed": 3, "built": 2, "up to date": 1, "skipped": 0}
    outcome_status: dict[str, str] = {}
    for r in reports:
        if r.name in publishers:
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
