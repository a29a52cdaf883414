"""Atomic outputs, private directories and hashing.

Every artifact is written to a temporary file in its target directory and
renamed into place, so an interrupted run never leaves a half-written file
that a later run would take as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for memory


def file_kind(mode: int) -> str:
    """What a stat mode says a path is, for messages ("a directory", ...)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def read_regular(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    A directory, device (``/dev/zero``), named pipe or socket is refused
    before anything is read, and so is a file larger than ``limit``: nothing
    a user names can make labforge block or read without bound.  Opening
    with O_NONBLOCK keeps a named pipe without a writer from blocking the
    open.  OSError (missing file, permission) is left to the caller; the
    other problems raise LabError naming ``what``."""
    from builders.core.errors import LabError
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LabError(f"{path}: {what} must be a regular file, not {file_kind(st.st_mode)}")
        if st.st_size > limit:
            raise LabError(f"{path}: {what} is {_size(st.st_size)}, more than the "
                           f"{_size(limit)} labforge reads; is it the right file?")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise LabError(f"{path}: {what} is larger than the {_size(limit)} labforge reads")
        return b"".join(chunks)
    finally:
        os.close(fd)


def os_reason(exc: OSError) -> str:
    """What went wrong, for a message: the OS's words, except where they
    mislead (mkdir over a dangling symlink says "File exists")."""
    name = exc.filename
    if name and os.path.islink(name) and not os.path.exists(name):
        return f"it is a dangling symlink (to {os.readlink(name)}, which does not exist)"
    return exc.strerror or str(exc)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it mode 0700.

    The directory is created 0700 (not created 0755 and narrowed after), so
    a run interrupted in between never leaves it open to other users."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
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
