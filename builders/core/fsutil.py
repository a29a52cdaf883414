"""Atomic outputs, private directories and hashing.

Every artifact is written to a temporary file in its target directory and
renamed into place, so an interrupted run never leaves a half-written file
that a later run would take as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for memory


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def atomic_path(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target``
    when the block succeeds, remove it when the block fails.

    The temporary name starts with ``.`` and ends with ``.part`` so that
    nothing mistakes it for an output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, mode)
        yield tmp_path
        os.chmod(tmp_path, mode)
        fsync_file(tmp_path)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(target: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` to ``target`` atomically with permissions ``mode``."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(target, mode) as tmp:
        # open with O_NOFOLLOW-free plain write: tmp was created by mkstemp (0600)
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(target)


def fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in constant memory."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_parts(directory: Path) -> None:
    """Remove ``.part`` files that an interrupted run left in ``directory``."""
    if not directory.is_dir():
        return
    for p in directory.glob(".*.part"):
        with contextlib.suppress(OSError):
            if p.is_dir():
                continue
            p.unlink()
