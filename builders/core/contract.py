"""The builder contract: what every artifact kind declares, and the one
runner that does the rest.

A builder is one object per artifact kind.  It *declares* its outputs (path,
manifest kind, label and the inputs their digest covers) and *produces*
files; it never locks, checks "up to date", writes a temporary file, renames,
records in the manifest or times itself.  :func:`run` does all of that, the
same way for every kind:

1. take the workspace's build lock;
2. ask the builder for its outputs (``outputs``: pure, may raise LabError for
   bad input) and let it check them together (``prepare``);
3. for each output, unless ``force``: is it up to date (``up_to_date``,
   by default its ledger says so)?  Otherwise ``build`` it into a
   :class:`Stage`;
4. when every build succeeded, commit the stage (fsync, rename, fsync the
   directories) and record each built output in its ledger (the manifest, or
   a secret ledger under certs/);
5. report an :class:`Outcome` per output.

A failure anywhere before the commit removes every staged file: a run never
leaves a half-written artifact, and a bad input for one output stops the run
before any output is replaced.

Publishers (they consume artifacts) and checks (they prove them) have
smaller contracts at the end of this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.core.errors import LabError
from builders.core.fsutil import fsync_dir, fsync_file
from builders.core.lab import Lab
from builders.core.manifest import Manifest, SecretLedger, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

log = logging.getLogger("labforge")

LEDGERS = ("manifest", "secret", "none")


@dataclass(frozen=True)
class Output:
    """One file a builder makes, named once, by the builder."""
    path: Path                  # absolute: under ws.artifacts, or ws.certs for secrets
    kind: str                   # manifest kind ("overlay", "seed-iso", ...)
    label: str                  # outcome label ("overlay broker1")
    inputs: tuple = ()          # what the output depends on: the input digest covers them
    ledger: str = "manifest"    # manifest | secret (state.json beside it, under certs/) | none
    mode: int = 0o644
    data: Any = field(default=None, compare=False)   # the builder's own plan, handed to build()

    def digest(self) -> str:
        return input_digest(self.kind, *self.inputs)


@dataclass
class Built:
    """What a build reports back to the runner."""
    detail: str = ""
    meta: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    sha256: str | None = None


@dataclass
class Context:
    lab: Lab
    ws: Workspace
    manifest: Manifest
    force: bool = False
    options: dict = field(default_factory=dict)

    def ledger(self, out: Output) -> Manifest | SecretLedger | None:
        return ledger_for(self.ws, out, self.manifest)


def ledger_for(ws: Workspace, out: Output, manifest: Manifest | None = None):
    if out.ledger == "manifest":
        return manifest or Manifest(ws.artifacts)
    if out.ledger == "secret":
        return SecretLedger(out.path.parent)
    return None


class Stage:
    """Every file a build writes, held as temporary files beside their
    targets until :meth:`commit` renames them all.

    ``file(path)`` gives a temporary path for a tool to create (qemu-img,
    diskimage-builder); ``write(path, data)`` stages content and leaves a
    file whose bytes (and mode) are already right untouched, so a rerun
    changes no mtime; ``remove(path)`` deletes at commit time.
    """

    def __init__(self) -> None:
        self._files: dict[Path, tuple[Path, int]] = {}     # target -> (temp, mode)
        self._removes: list[Path] = []
        self._chmods: dict[Path, int] = {}
        self.touched: set[Path] = set()                     # targets that will change

    def file(self, path: Path, mode: int = 0o644) -> Path:
        path = Path(path)
        self._drop(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)                  # the tool creates it; qemu-img refuses nothing, DIB neither
        self._files[path] = (Path(tmp), mode)
        self.touched.add(path)
        return Path(tmp)

    def write(self, path: Path, data: bytes | str, mode: int = 0o644) -> None:
        path = Path(path)
        data = data.encode() if isinstance(data, str) else data
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) \
                    and path.read_bytes() == data:
                self._drop(path)
                if path.stat().st_mode & 0o777 != mode:
                    self._chmods[path] = mode
                return
        tmp = self.file(path, mode)
        with open(tmp, "xb") as fh:
            fh.write(data)

    def remove(self, path: Path) -> None:
        path = Path(path)
        self._drop(path)
        if os.path.lexists(path):
            self._removes.append(path)
            self.touched.add(path)

    def _drop(self, path: Path) -> None:
        old = self._files.pop(path, None)
        if old is not None:
            with contextlib.suppress(FileNotFoundError):
                old[0].unlink()
        self._chmods.pop(path, None)
        self.touched.discard(path)
        if path in self._removes:
            self._removes.remove(path)

    def commit(self) -> None:
        """fsync every staged file, rename them into place, fsync the directories."""
        for target, (tmp, mode) in self._files.items():
            if not tmp.exists():
                raise LabError(f"{target}: the build reported success but wrote nothing; "
                               "this is a labforge bug")
            os.chmod(tmp, mode)
        tmps = [tmp for tmp, _ in self._files.values()]
        if len(tmps) > 1:
            # in parallel threads: the file system commits them together (one
            # journal commit for many small files, e.g. 50 seeds, not one each)
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=min(16, len(tmps))) as pool:
                list(pool.map(fsync_file, tmps))
        else:
            for tmp in tmps:
                fsync_file(tmp)
        dirs: set[Path] = set()
        for target, (tmp, _) in self._files.items():
            os.replace(tmp, target)
            dirs.add(target.parent)
        for path in self._removes:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            dirs.add(path.parent)
        for path, mode in self._chmods.items():
            os.chmod(path, mode)
        for d in dirs:
            fsync_dir(d)
        self._files.clear()

    def discard(self) -> None:
        for tmp, _ in self._files.values():
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
        self._files.clear()


class Builder:
    """One artifact kind.  Subclasses set the class attributes and implement
    :meth:`outputs` and :meth:`build`; the other hooks have defaults."""

    name: str = ""                      # step name in `invoke all`; "" when not a pipeline step
    kind: str = ""                      # manifest kind of its outputs
    help: str = ""
    needs: tuple[str, ...] = ()         # steps whose outputs this one consumes

    def skip_reason(self, lab: Lab, ws: Workspace) -> str | None:
        """Why this step cannot run here (no Docker engine...), or None."""
        return None

    def outputs(self, lab: Lab, ws: Workspace, **options) -> list[Output]:
        raise NotImplementedError

    def prepare(self, ctx: Context, outputs: list[Output]) -> None:
        """Checks across all outputs before any is built (default: none)."""

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        """None when ``out`` must be built; else the detail of "up to date"."""
        ledger = ctx.ledger(out)
        if ledger is not None and ledger.is_current(out.path, digest):
            return ""
        return None

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        raise NotImplementedError

    def ready(self, lab: Lab, ws: Workspace) -> str | None:
        """For a step the user left out: None when its declared outputs are
        present and intact, else what is missing."""
        try:
            outs = self.outputs(lab, ws)
        except LabError as exc:
            return str(exc)
        manifest = Manifest(ws.artifacts)
        for out in outs:
            ledger = ledger_for(ws, out, manifest)
            if ledger is None:
                if not out.path.is_file():
                    return f"{out.path} is missing"
                continue
            rec = ledger.get(out.path)
            if rec is None:
                return f"{ledger.path} has no record of {out.path.name}"
            if not ledger.intact(out.path, rec):
                return f"{out.path} is missing or differs from {ledger.path.name}"
        return None


@dataclass
class _Done:
    out: Output
    digest: str
    status: str                 # "built" | "up to date"
    detail: str = ""
    built: Built | None = None
    seconds: float = 0.0


def run(builder: Builder, lab: Lab, ws: Workspace, *, force: bool = False,
        **options) -> list[Outcome]:
    """Build ``builder``'s outputs that are not up to date (all with ``force``)."""
    with BuildLock(ws):
        ctx = Context(lab, ws, Manifest(ws.artifacts), force, options)
        outs = builder.outputs(lab, ws, **options)
        builder.prepare(ctx, outs)
        stage = Stage()
        done: list[_Done] = []
        try:
            for out in outs:
                digest = out.digest()
                if not force:
                    detail = builder.up_to_date(ctx, out, digest)
                    if detail is not None:
                        done.append(_Done(out, digest, "up to date", detail))
                        continue
                before = set(stage.touched)
                start = time.monotonic()
                log.debug("%s: building", out.label)
                built = builder.build(ctx, out, stage)
                ledger = ctx.ledger(out)
                # nothing changes on disk and the ledger agrees: up to date after all
                changed = bool(stage.touched - before) or (
                    ledger is not None and not ledger.is_current(out.path, digest))
                done.append(_Done(out, digest, "built" if changed else "up to date",
                                  built.detail, built, time.monotonic() - start))
            stage.commit()
        except BaseException:
            stage.discard()
            raise
        _record(ctx, [d for d in done if d.status == "built"])
        return [Outcome(d.out.label, d.status, [d.out.path], d.detail, d.seconds) for d in done]


def _record(ctx: Context, built: list[_Done]) -> None:
    """One rewrite of each ledger for everything built into it."""
    by_ledger: dict[Path, tuple[Any, list[dict]]] = {}
    for d in built:
        ledger = ctx.ledger(d.out)
        if ledger is None or d.built is None:
            continue
        item = dict(path=d.out.path, kind=d.out.kind, digest=d.digest, tools=d.built.tools,
                    meta=d.built.meta, sha256=d.built.sha256)
        by_ledger.setdefault(ledger.path, (ledger, []))[1].append(item)
    for ledger, items in by_ledger.values():
        ledger.record_many(items)


# --------------------------------------------------------------------------
# publishers and checks
# --------------------------------------------------------------------------
class Publisher:
    """Consumes artifacts (named in the manifest) and hands them to a service."""

    name: str = ""
    help: str = ""
    needs: tuple[str, ...] = ()

    def skip_reason(self, lab: Lab, ws: Workspace) -> str | None:
        return None

    def publish(self, lab: Lab, ws: Workspace, **options) -> list[Outcome]:
        raise NotImplementedError


class Check:
    """Proves an artifact works (boots it, talks to it); outcomes say "passed"."""

    name: str = ""
    help: str = ""

    def check(self, lab: Lab, ws: Workspace, **options) -> list[Outcome]:
        raise NotImplementedError
