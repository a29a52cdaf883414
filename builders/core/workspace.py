"""Where a lab's outputs live.

A workspace is a directory holding ``certs/`` (secret material, 0700, never
published), ``artifacts/`` (everything safe to publish, with
``manifest.json``) and ``cache/`` (download and build caches kept between
runs).  :meth:`Workspace.default` picks it for a lab: ``LABFORGE_WORKDIR``
when set (CI jobs and tests use that), else the lab file's directory (for
the checkout's own ``lab.yaml`` that is the checkout), else, for the
embedded lab of an installed copy, the current directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders.core import resources
from builders.core.errors import LabError
from builders.core.fsutil import private_dir


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def default(cls, lab: Any = None) -> "Workspace":
        """The workspace for ``lab`` (a loaded Lab, the path given to
        ``--lab``, or None for the embedded default lab):
        ``LABFORGE_WORKDIR`` when set, else the directory of the lab file,
        except that the embedded lab of an installed copy lives inside the
        package, so its outputs go to the current directory instead."""
        root = os.environ.get("LABFORGE_WORKDIR")
        if root:
            return cls(Path(root).resolve())
        source = getattr(lab, "source", lab)
        source = Path(source) if source else resources.default_lab()
        if resources.is_embedded_lab(source):
            return cls(Path.cwd().resolve())
        return cls(source.resolve().parent)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def manifest_path(self) -> Path:
        return self.artifacts / "manifest.json"

    def certs_dir(self, *parts: str) -> Path:
        """A directory under certs/, created 0700 along with certs/ itself."""
        path = private_dir(self.certs)
        for part in parts:
            path = private_dir(path / part)
        return path

    def artifact_dir(self, *parts: str) -> Path:
        path = self.artifacts.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self, *parts: str) -> Path:
        path = self.cache.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


# names of the temporary outputs builders make next to their targets
# (fsutil.atomic_path, seed, vagrant, amphora: .NAME.XXXX.part; dib: .NAME.XXXX.dib)
TEMP_SUFFIXES = (".part", ".dib")


def _same_fs_tree(path: Path) -> bool:
    """True when nothing under ``path`` is a mount point (a dead image build
    may have left one; removing through it would reach another file system)."""
    dev = path.lstat().st_dev
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            with contextlib.suppress(OSError):
                if os.lstat(full).st_dev != dev or os.path.ismount(full):
                    return False
    return True


def remove_stale_temps(ws: "Workspace") -> list[Path]:
    """Remove the temporary outputs a killed run (kill -9, power loss) left
    under artifacts/ and certs/; return what was removed.

    Only called with the build lock held, so no live build owns them; the
    manifest's temporary file is removed under the manifest's own lock too
    (a reader refreshing recorded stats may write it without the build
    lock).  cache/ is not swept: an interrupted download there is resumed on
    purpose."""
    removed: list[Path] = []
    manifest_tmp = sorted(ws.artifacts.glob(".manifest.json.*.part"))
    if manifest_tmp:
        fd = os.open(ws.artifacts / ".manifest.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for tmp in ws.artifacts.glob(".manifest.json.*.part"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
        finally:
            os.close(fd)
    for root in (ws.artifacts, ws.certs):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*filenames, *dirnames]:
                if not (name.startswith(".") and name.endswith(TEMP_SUFFIXES)) or \
                        name.startswith(".manifest.json."):
                    continue
                full = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    if full.is_dir() and not full.is_symlink():
                        if not _same_fs_tree(full):
                            continue
                        shutil.rmtree(full)
                    else:
                        full.unlink()
                    removed.append(full)
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).exists()]
    return removed


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file.  A holder that
    took the lock a moment ago may not have written it yet: wait briefly."""
    for _ in range(50):
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.02)
    return "unknown"


class BuildLock:
    """An exclusive lock on a workspace for the length of a build.

    Two runs on the same tree must not interleave writes to the manifest or an
    artifact; the second one is refused at once with the holder's pid.
    The lock is an ``flock`` on ``artifacts/.lock``, so it is released by the
    kernel when the holder dies, even by ``kill -9``.
    """

    # held locks of this process, by path: nested builders share one lock
    _held: dict[Path, list[int]] = {}

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.path = ws.artifacts.resolve() / ".lock"

    def __enter__(self) -> "BuildLock":
        held = BuildLock._held.get(self.path)
        if held:
            held[1] += 1
            return self
        self.ws.artifacts.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            raise LabError(f"{self.ws.artifacts}: another build is running (pid {holder}); "
                           "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        BuildLock._held[self.path] = [fd, 1]
        remove_stale_temps(self.ws)     # ours now: what a killed run left is garbage
        return self

    def __exit__(self, *exc) -> None:
        held = BuildLock._held[self.path]
        held[1] -= 1
        if held[1] == 0:
            del BuildLock._held[self.path]
            os.ftruncate(held[0], 0)
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
