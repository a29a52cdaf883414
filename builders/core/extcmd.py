"""The one runner for external commands.

It logs the command (with secrets masked), captures stderr, and turns a
failure into a :class:`LabError` carrying the tool's last lines.  Secrets are
never passed on a command line by labforge; ``secrets=`` is a second line of
defence for anything that ends up in argv, the environment or a tool's
output.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from builders.core.errors import LabError

log = logging.getLogger("labforge")

# Debian package that provides each tool we call, for the "install it" hint.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "docker": "docker.io",
    "dockerd": "docker.io",
    "vagrant": "vagrant",
    "keytool": "openjdk-17-jre-headless",
    "java": "openjdk-17-jre-headless",
    "javac": "openjdk-17-jdk-headless",
    "openssl": "openssl",
    "debootstrap": "debootstrap",
    "disk-image-create": "diskimage-builder (pip)",
    "xorriso": "xorriso",
    "isoinfo": "genisoimage",
    "genisoimage": "genisoimage",
    "cloud-localds": "cloud-image-utils",
    "virsh": "libvirt-clients",
    "virt-xml-validate": "libvirt-clients",
    "blkid": "util-linux",
}

TAIL_LINES = 12


def require(tool: str) -> str:
    """Absolute path of ``tool`` or a LabError saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        pkg = PACKAGES.get(tool, tool)
        raise LabError(f"{tool}: not found on PATH; install it (Debian package: {pkg}) "
                       "or run scripts/setup.sh")
    return path


def mask(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def safe_url(url: str) -> str:
    """``url`` with its userinfo (a password or token) masked: https://***@host/..."""
    import re
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]+@", r"\1***@", url, flags=re.I)


def display(argv: Sequence[str], secrets: Sequence[str] = ()) -> str:
    """The command as a shell-like line, secrets masked."""
    import shlex
    return mask(" ".join(shlex.quote(str(a)) for a in argv), secrets)


def run(argv: Sequence[str | os.PathLike], *, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, input: bytes | str | None = None,
        timeout: float | None = None, secrets: Sequence[str] = (),
        check: bool = True, capture_stdout: bool = True,
        stdout=None, stderr=None, what: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv``; on failure raise LabError naming the command and its last lines.

    ``env`` is added to the current environment.  ``stdout``/``stderr`` may
    be file objects (for build logs); otherwise both are captured.  ``what``
    is a short description used in the error ("building the amphora").
    """
    argv = [str(a) for a in argv]
    exe = require(argv[0]) if os.sep not in argv[0] else argv[0]
    shown = display(argv, secrets)
    log.debug("run: %s", shown)
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update({k: str(v) for k, v in env.items()})
    if isinstance(input, str):
        input = input.encode()
    try:
        proc = subprocess.run(
            [exe, *argv[1:]], cwd=cwd, env=full_env, input=input, timeout=timeout,
            stdout=stdout if stdout is not None else (subprocess.PIPE if capture_stdout else None),
            stderr=stderr if stderr is not None else subprocess.PIPE,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what or argv[0]}: `{shown}` did not finish within {timeout:.0f}s",
                       _tail(exc.stderr, secrets)) from None
    except OSError as exc:
        raise LabError(f"{what or argv[0]}: cannot run `{shown}`: {exc.strerror}") from None
    if check and proc.returncode != 0:
        tail = _tail(proc.stderr, secrets) or _tail(proc.stdout, secrets)
        last = tail[-1] if tail else "(no output)"
        raise LabError(f"{what or argv[0]}: `{shown}` failed with exit status "
                       f"{proc.returncode}: {last}", tail[:-1])
    return proc


def _tail(data: bytes | str | None, secrets: Sequence[str]) -> list[str]:
    if not data:
        return []
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    lines = [mask(line.rstrip(), secrets) for line in data.splitlines() if line.strip()]
    return lines[-TAIL_LINES:]


@functools.lru_cache(maxsize=None)
def tool_version(tool: str) -> str | None:
    """First version-looking string a tool prints, for the manifest; None if absent."""
    path = shutil.which(tool)
    if path is None:
        return None
    for flag in ("--version", "-version", "version"):
        try:
            proc = subprocess.run([path, flag], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        m = re.search(r"\d+\.\d+(?:\.\d+)?(?:[-+~.][\w.+~-]*)?", text)
        if proc.returncode == 0 and m:
            return m.group(0)
    return None
