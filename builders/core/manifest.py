"""``artifacts/manifest.json``: one record per artifact.

A record holds what a CI job or a publisher needs to trust an artifact:
kind, path (relative to artifacts/), sha256, size, the digest of the inputs
it was built from, when it was created, the versions of the tools that made
it, and kind-specific metadata.  It never holds secrets.

Builders ask :meth:`Manifest.is_current` before building: the output is
current when a record exists with the same input digest and the file on disk
is intact.  "Intact" is checked by stat (size, mtime, inode) against the
record and, when that differs, by re-hashing; ``invoke verify`` re-hashes
everything.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from builders.core.errors import LabError
from builders.core.fsutil import atomic_write, read_regular, sha256_file

SCHEMA_VERSION = 1


def input_digest(*parts: Any) -> str:
    """A stable sha256 over build inputs.

    Parts may be str, bytes, numbers, bools, None, lists/tuples, dicts and
    :class:`pathlib.Path` (a path contributes its name and content, so
    changing a template or a key file changes the digest).
    """
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, Path):
            h.update(b"P")
            feed(str(obj.name))
            if obj.is_file():
                h.update(bytes.fromhex(sha256_file(obj)))
            elif obj.is_dir():
                for child in sorted(obj.rglob("*")):
                    if child.is_file():
                        feed(str(child.relative_to(obj)))
                        h.update(bytes.fromhex(sha256_file(child)))
            else:
                h.update(b"-missing-")
        elif isinstance(obj, bytes):
            h.update(b"B%d:" % len(obj) + obj)
        elif isinstance(obj, str):
            data = obj.encode()
            h.update(b"S%d:" % len(data) + data)
        elif isinstance(obj, (list, tuple)):
            h.update(b"L%d[" % len(obj))
            for item in obj:
                feed(item)
            h.update(b"]")
        elif isinstance(obj, Mapping):
            h.update(b"D%d{" % len(obj))
            for key in sorted(obj, key=str):
                feed(str(key))
                feed(obj[key])
            h.update(b"}")
        elif obj is None or isinstance(obj, (bool, int, float)):
            feed(json.dumps(obj))
        else:
            feed(repr(obj))

    for part in parts:
        feed(part)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class Manifest:
    """Read-modify-write access to manifest.json under a file lock."""

    FILE = "manifest.json"
    MODE = 0o644

    def __init__(self, artifacts: Path):
        self.root = Path(artifacts)
        self.path = self.root / self.FILE
        self._lock_path = self.root / f".{Path(self.FILE).stem}.lock"   # .manifest.lock

    # -- reading -----------------------------------------------------------
    def load(self) -> dict:
        try:
            data = json.loads(read_regular(self.path, "the manifest", 64 << 20))
        except FileNotFoundError:
            return {"version": SCHEMA_VERSION, "artifacts": {}}
        except LabError as exc:
            raise LabError(f"{exc}; move it away and rebuild, or restore it") from None
        except (OSError, ValueError) as exc:
            raise LabError(f"{self.path}: unreadable manifest ({exc}); move it away and "
                           "rebuild, or restore it from your CI artifacts") from None
        if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
            raise LabError(f"{self.path}: not a labforge manifest; move it away and rebuild")
        return data

    def entries(self) -> dict[str, dict]:
        return self.load()["artifacts"]

    def get(self, path: Path | str) -> dict | None:
        return self.entries().get(self.rel(path))

    def rel(self, path: Path | str) -> str:
        p = Path(path)
        if p.is_absolute():
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                raise LabError(f"{p}: not under {self.root}; artifacts live under artifacts/") from None
        return p.as_posix()

    def is_current(self, path: Path, digest: str) -> bool:
        """True when ``path`` was built from inputs with ``digest`` and is intact."""
        rec = self.get(path)
        if rec is None or rec.get("input_digest") != digest:
            return False
        return self.intact(path, rec)

    def intact(self, path: Path, rec: dict) -> bool:
        path = self.root / self.rel(path)
        try:
            key = _stat_key(path)
        except FileNotFoundError:
            return False
        if rec.get("stat") == key:
            return True
        if key[0] != rec.get("size") or sha256_file(path) != rec.get("sha256"):
            return False
        with self._locked() as data:  # content is right; remember the new stat
            if self.rel(path) in data["artifacts"]:
                data["artifacts"][self.rel(path)]["stat"] = key
        return True

    # -- writing -----------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, self.MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            yield data
            atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n",
                         mode=self.MODE)
        finally:
            os.close(fd)

    def record(self, path: Path, kind: str, digest: str, *, tools: Mapping[str, Any] | None = None,
               meta: Mapping[str, Any] | None = None, sha256: str | None = None) -> dict:
        """Record the artifact at ``path`` (hashing it unless ``sha256`` is given)."""
        return self.record_many([dict(path=path, kind=kind, digest=digest, tools=tools,
                                      meta=meta, sha256=sha256)])[0]

    def record_many(self, items: list[Mapping[str, Any]]) -> list[dict]:
        """:meth:`record` for several artifacts (each a mapping of record()'s
        arguments) with one lock and one rewrite of manifest.json: builders that
        make many small artifacts (a seed per host) avoid rewriting it each time."""
        recs = []
        for item in items:
            rel = self.rel(item["path"])
            full = self.root / rel
            recs.append({
                "kind": item["kind"],
                "path": rel,
                "sha256": item.get("sha256") or sha256_file(full),
                "size": full.stat().st_size,
                "input_digest": item["digest"],
                "created": _now(),
                "tools": {k: v for k, v in (item.get("tools") or {}).items() if v is not None},
                "meta": dict(item.get("meta") or {}),
                "stat": _stat_key(full),
            })
        if recs:
            with self._locked() as data:
                for rec in recs:
                    data["artifacts"][rec["path"]] = rec
        return recs

    def update_meta(self, path: Path | str, **meta: Any) -> None:
        """Merge ``meta`` into an existing record (publishers add their results)."""
        rel = self.rel(path)
        with self._locked() as data:
            if rel not in data["artifacts"]:
                raise LabError(f"{rel}: not in {self.path}; build it first")
            data["artifacts"][rel]["meta"].update(meta)

    def remove(self, path: Path | str) -> None:
        rel = self.rel(path)
        with self._locked() as data:
            data["artifacts"].pop(rel, None)

    def unrecorded_outputs(self) -> list[str]:
        """Artifacts present under the root (logs and labforge's own dot files
        aside) though the manifest is missing: what `verify` cannot vouch for."""
        if not self.root.is_dir() or os.path.lexists(self.path):
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")
                           and not (rel_dir == Path(".") and d == "logs")]
            out += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
        return sorted(out)

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every artifact; return (path, problem) for each that drifted.

        A missing manifest with artifacts present is a LabError: there is
        nothing to verify them against (a manifest that cannot be read is
        one already, from :meth:`load`)."""
        present = self.unrecorded_outputs()
        if present:
            raise LabError(f"{self.path}: missing, but {len(present)} artifacts are present "
                           f"({present[0]}{', ...' if len(present) > 1 else ''}); restore the "
                           "manifest or rebuild them (invoke all --force)")
        problems = []
        for rel, rec in sorted(self.entries().items()):
            full = self.root / rel
            if not full.exists():
                problems.append((rel, "missing"))
            elif full.stat().st_size != rec.get("size"):
                problems.append((rel, f"size {full.stat().st_size} != recorded {rec.get('size')}"))
            elif sha256_file(full) != rec.get("sha256"):
                problems.append((rel, "sha256 differs from the manifest"))
        return problems

    def resolve(self, image: str, kinds: tuple[str, ...] = ()) -> tuple[Path, dict | None]:
        """An ``--image`` argument: an existing file (with its record when it is
        an artifact, else None), or a record's name as :meth:`find` takes it."""
        p = Path(image).expanduser()
        if p.is_file():
            p = p.resolve()
            try:
                rel = p.relative_to(self.root.resolve()).as_posix()
            except ValueError:
                return p, None                      # outside artifacts/: a plain path
            rec = self.entries().get(rel)
            return (self.root / rel, rec) if rec is not None else (p, None)
        if p.exists():
            raise LabError(f"{image}: not a regular file; give an image file or a name from {self.path}")
        path, rec = self.find(image, kinds)
        if not path.is_file():
            raise LabError(f"{path}: recorded in {self.path} but missing; rebuild it")
        return path, rec

    def find(self, name_or_path: str, kinds: tuple[str, ...] = ()) -> tuple[Path, dict]:
        """Resolve an image argument: a path under artifacts/, or a record's
        file name / stem (``debian-12``, ``amphora-x64-haproxy.qcow2``)."""
        entries = self.entries()
        p = Path(name_or_path)
        candidates = []
        for rel, rec in entries.items():
            if kinds and rec.get("kind") not in kinds:
                continue
            rp = Path(rel)
            if name_or_path in (rel, rp.name, rp.stem) or (p.is_absolute() and self.root / rel == p):
                candidates.append((self.root / rel, rec))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(sorted(str(c[0].relative_to(self.root)) for c in candidates))
            raise LabError(f"{name_or_path}: matches several artifacts ({names}); give the path")
        want = " or ".join(kinds) if kinds else "artifact"
        raise LabError(f"{name_or_path}: no {want} of that name in {self.path}; "
                       "build it first or give a path under artifacts/")


class SecretLedger(Manifest):
    """The manifest's twin for secret outputs (seeds that carry certs/
    material): ``ledger.json`` in their directory under certs/, 0600, so the
    publishable manifest never names them.  Same records, same checks."""

    FILE = "ledger.json"
    MODE = 0o600
