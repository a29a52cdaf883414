"""A Docker Engine to talk to, through the docker SDK (Engine API).

``client(ws)`` returns a connected ``docker.DockerClient``.  When no engine
answers on the default socket and the user is root, it starts ``dockerd``
(Debian's docker.io package) in the background, logging to
``cache/dockerd.log``, and waits for its socket.  When ``DOCKER_HOST`` names
an engine explicitly, labforge never starts one: the user asked for that
engine, so an unreachable one is an error with one clear line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time

from builders.core.errors import LabError
from builders.core.workspace import Workspace

log = logging.getLogger("labforge")

DEFAULT_SOCKET = "/var/run/docker.sock"
START_TIMEOUT = 60.0


def _connect(base_url: str | None):
    import docker
    from docker.errors import DockerException
    try:
        if base_url:
            cli = docker.DockerClient(base_url=base_url, timeout=600)
        else:
            cli = docker.from_env(timeout=600)
        cli.ping()
        return cli
    except (DockerException, OSError, ValueError) as exc:
        log.debug("docker: no engine: %s", exc)
        return None


def client(ws: Workspace, *, start: bool = True):
    """A connected DockerClient, starting dockerd when allowed (see module doc)."""
    host = os.environ.get("DOCKER_HOST")
    cli = _connect(None)
    if cli is not None:
        return cli
    if host:
        raise LabError(f"docker: no engine answers at DOCKER_HOST={host}; start it or unset "
                       "DOCKER_HOST to use the local engine")
    if os.path.exists(DEFAULT_SOCKET) and not os.access(DEFAULT_SOCKET, os.R_OK | os.W_OK):
        raise LabError(f"docker: permission denied on {DEFAULT_SOCKET}; run as root or join "
                       "the group that owns it (usually `docker`), then log in again")
    if not start or os.geteuid() != 0:
        raise LabError(f"docker: no engine answers at {DEFAULT_SOCKET}; start it "
                       "(`sudo systemctl start docker` or `sudo dockerd &`) or set DOCKER_HOST")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise LabError("dockerd: not found on PATH; install it (Debian package: docker.io) "
                       "or run scripts/setup.sh")
    logpath = ws.cache_dir() / "dockerd.log"
    log.info("docker: no engine running; starting dockerd (log: %s)", logpath)
    with open(logpath, "ab") as fh:
        proc = subprocess.Popen([dockerd], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(logpath)
            raise LabError(f"dockerd: exited with status {proc.returncode} while starting; "
                           f"see {logpath}", tail)
        if os.path.exists(DEFAULT_SOCKET):
            cli = _connect(None)
            if cli is not None:
                log.info("docker: dockerd %s is up (pid %d)", cli.version().get("Version", "?"), proc.pid)
                return cli
        time.sleep(0.5)
    with contextlib.suppress(OSError):
        proc.terminate()
    raise LabError(f"dockerd: did not answer within {START_TIMEOUT:.0f}s; see {logpath}",
                   _tail(logpath))


def _tail(path, n: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def engine_version(cli) -> str:
    try:
        return str(cli.version().get("Version", "unknown"))
    except Exception:  # noqa: BLE001 - version is informational only
        return "unknown"


def reachable():
    """A connected DockerClient when an engine already answers, else None.

    Never starts dockerd: for callers that only want to know whether a
    local image exists (``base_image.builder: auto``).
    """
    return _connect(None)


def run_streaming(cli, image: str, command, *, logfh, on_line=None, keep: int = 4000,
                  **create) -> tuple[int, list[str]]:
    """Run a container to completion, streaming its output line by line.

    Each line goes to ``logfh`` and to ``on_line(line)`` (progress).  Returns
    (exit status, the last lines of output, at most ``keep``).  On any
    exception (Ctrl-C included) the container is killed; it is always
    removed.  ``create`` goes to ``containers.create`` (volumes,
    environment, network_mode, device access, labels, ...).
    """
    container = cli.containers.create(image, command, **create)
    lines: list[str] = []
    try:
        container.start()
        buf = ""
        for chunk in container.logs(stream=True, follow=True):
            buf += chunk.decode("utf-8", "replace")
            *complete, buf = buf.split("\n")
            for line in complete:
                logfh.write(line + "\n")
                lines.append(line)
                if len(lines) > keep:
                    del lines[:keep // 2]
                if on_line is not None:
                    on_line(line)
        if buf:
            logfh.write(buf + "\n")
            lines.append(buf)
            if on_line is not None:
                on_line(buf)
        logfh.flush()
        code = container.wait().get("StatusCode", 1)
    except BaseException:
        with contextlib.suppress(Exception):
            container.kill()
        raise
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
    return code, lines


def image_path_env(cli, image: str) -> str:
    """The PATH an image's containers start with (its ENV), else Debian's default."""
    for item in cli.images.get(image).attrs.get("Config", {}).get("Env") or ():
        if item.startswith("PATH="):
            return item[5:]
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
