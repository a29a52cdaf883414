"""Helpers shared by the tests (fixtures are in conftest.py).

One of each: the checkout (:data:`ROOT`) and its ``invoke`` (:data:`INVOKE`),
running a command (:func:`sh`), a qcow2 to work with (:func:`make_qcow2`),
the default lab varied (:func:`lab_data`, :func:`lab_text`,
:func:`lab_file`, :func:`lab_from`) or a lab written verbatim
(:func:`write_lab`), what a file tree holds (:func:`tree_snapshot`,
:func:`changed`) and the bad-input contract (:func:`assert_one_line_error`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from builders.core import lab as labmod
from builders.core.errors import LabError

ROOT = Path(__file__).resolve().parent.parent
INVOKE = [sys.executable, "-m", "invoke", "-r", str(ROOT)]


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------
def sh(*argv: Any, check: bool = True, timeout: float | None = 600,
       **kw) -> subprocess.CompletedProcess:
    """Run a command (arguments may be paths), capturing text output; with
    ``check`` a failure fails the test showing the command and its output."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, (argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
def make_qcow2(path: Path, size: str = "64M", data_mib: int = 0, random: bool = False) -> Path:
    """A real qcow2 of ``size`` virtual bytes holding ``data_mib`` MiB of data:
    the byte 0x5a from offset 0 (the same image on every call), or with
    ``random`` 1 MiB blocks of random bytes every 2 MiB (a different image on
    every call; ``size`` must hold 2 x ``data_mib`` MiB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not random:
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, size)
        if data_mib:
            sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data_mib}M", path)
        return path
    raw = path.with_suffix(".raw")
    sh("qemu-img", "create", "-q", "-f", "raw", raw, size)
    with open(raw, "r+b") as fh:
        for i in range(data_mib):
            fh.seek(i * (2 << 20))
            fh.write(os.urandom(1 << 20))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


# --------------------------------------------------------------------------
# labs
# --------------------------------------------------------------------------
def _apply(node: dict, key: str, value: Any) -> None:
    """Merge ``value`` into ``node[key]``: a mapping merges into a mapping
    (recursively), None removes the key, anything else replaces it."""
    if value is None:
        node.pop(key, None)
    elif isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _apply(node[key], k, v)
    else:
        node[key] = copy.deepcopy(value)


def lab_data(**changes: Any) -> dict:
    """The default lab (the checkout's lab.yaml) as a dict, with ``changes``.

    A change's key is a section or a dotted path into it (pass those as
    ``**{"hosts.broker2.ip": "10.100.0.22"}``); a mapping value merges into
    what is there (``base_image={"source": "download"}`` keeps the other
    base_image keys), None removes the key, any other value replaces it."""
    data = yaml.safe_load((ROOT / "lab.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        _apply(node, last, value)
    return data


def lab_text(**changes: Any) -> str:
    """:func:`lab_data` as lab.yaml text."""
    return yaml.safe_dump(lab_data(**changes), sort_keys=False)


def write_lab(where: Path, text: str, filename: str = "lab.yaml") -> Path:
    """``where``/``filename`` holding exactly ``text`` (a lab written out in a test)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / filename
    path.write_text(text)
    return path


def lab_file(where: Path, *, filename: str = "lab.yaml", **changes: Any) -> Path:
    """The default lab with ``changes`` (see :func:`lab_data`), written to
    ``where``/``filename``."""
    return write_lab(where, lab_text(**changes), filename)


def broker_nics(n: int) -> dict:
    """A broker's NICs as the default lab gives them (public, then private),
    for a host added to it: ``lab_file(p, **{"hosts.b4": broker_nics(14)})``."""
    return {"nics": [{"network": "public", "ip": f"192.168.100.{n}", "mac": f"52:54:00:10:00:{n:02x}"},
                     {"network": "private", "ip": f"10.100.0.{n}", "mac": f"52:54:00:64:00:{n:02x}"}]}


def plain_host(n: int) -> dict:
    """A host that is not a broker (one NIC on private, no roles): its seed
    takes nothing from certs/, so it is public, under artifacts/seed/."""
    return {"roles": [], "nics": [{"network": "private", "ip": f"10.100.0.{n}",
                                   "mac": f"52:54:00:64:00:{n:02x}"}]}


def problems(data: dict) -> list[str]:
    """The lines of the error a lab given as data gets (none: it loads)."""
    try:
        labmod.from_dict(data, source=Path("lab.yaml"))
    except LabError as exc:
        return exc.lines()
    return []


def lab_from(where: Path, *, filename: str = "lab.yaml", **changes: Any) -> labmod.Lab:
    """:func:`lab_file`, loaded: a Lab as if read from ``where``/``filename``."""
    return labmod.load(lab_file(where, filename=filename, **changes))


# --------------------------------------------------------------------------
# file trees
# --------------------------------------------------------------------------
LOCKS = (".lock", ".manifest.lock", ".ledger.lock")     # lock files: held, not content


def tree_snapshot(root: Path, *, mtimes: bool = False, hidden: bool = True) -> dict[str, tuple]:
    """Every file under ``root`` (lock files aside) with its sha256 and mode,
    and with ``mtimes`` its mtime_ns too (to tell "rewritten" from
    "untouched"); ``hidden=False`` leaves out dot-files."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name in LOCKS or (not hidden and p.name.startswith(".")):
            continue
        st = p.stat()
        entry = (hashlib.sha256(p.read_bytes()).hexdigest(), oct(st.st_mode & 0o7777))
        out[str(p.relative_to(root))] = entry + ((st.st_mtime_ns,) if mtimes else ())
    return out


def changed(before: dict, after: dict) -> set[str]:
    """Names of files added, removed or modified between two snapshots."""
    return {n for n in set(before) | set(after) if before.get(n) != after.get(n)}


# --------------------------------------------------------------------------
# the bad-input contract
# --------------------------------------------------------------------------
def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str,
                          where: str = "first") -> str:
    """Exit 1, no traceback, exactly one ``error: ...`` line, and ``needles``
    in that message (the line and its indented continuation lines); return
    the line.

    ``where`` says where the line is in stderr: ``first`` (bad input found
    before any work: nothing precedes it), ``last`` (nothing follows it:
    progress and log lines may precede it) or ``any`` (failures after work
    began: progress lines before it, a tool's last lines after it)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(at) == 1, proc.stderr
    if where == "first":
        assert at[0] == 0, proc.stderr
    elif where == "last":
        assert lines[-1] == lines[at[0]], proc.stderr
    else:
        assert where == "any", where
    message = [lines[at[0]]]
    for ln in lines[at[0] + 1:]:
        if not ln.startswith("  "):
            break
        message.append(ln)
    text = "\n".join(message)
    for n in needles:
        assert n in text, (n, proc.stderr)
    return lines[at[0]]
