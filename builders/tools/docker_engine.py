"""A Docker Engine to talk to (docker SDK, Engine API), and the builder image.

The engine: ``client(ws)`` returns a connected ``docker.DockerClient``.
When no engine answers on the default socket and the user is root, it
starts ``dockerd`` (Debian's docker.io package) in the background, logging
to ``cache/dockerd.log``, and waits for its socket.  When ``DOCKER_HOST``
names an engine explicitly, labforge never starts one: the user asked for
that engine, so an unreachable one is an error with one clear line.
:func:`docker_errors` turns an Engine API error into one user line;
:func:`run_streaming` runs a container to completion, streaming its output;
:func:`device_access` grants a container loop devices, mounts and chroots.

The builder image (``labforge/amphora-builder:<digest>``,
``dockerfiles/amphora/Dockerfile``): diskimage-builder pinned, Octavia's
elements and agent source from the Octavia sdist on PyPI, labforge's local
elements and the kpartx/dmsetup stand-ins.  The amphora is built in it, and
so is the base image when ``base_image.builder`` says container.  It starts
FROM a local Debian base (:func:`build_builder_base`: debootstrap into a
folder, ``docker import``), because no container registry is reachable
where labforge builds; ``build.builder_from`` names another image.  Its tag
is a digest of everything it is made from (:func:`builder_inputs`), so
:func:`builder_tag` finds it without building anything and
:func:`ensure_builder` builds it only when absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

from builders.core import extcmd, resources
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write
from builders.core.lab import Lab
from builders.core.manifest import input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace
from builders.tools import distros
from builders.tools.buildenv import ca_bundle, pip_index, proxy_environment

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


@contextlib.contextmanager
def docker_errors(what: str):
    """A Docker Engine API error becomes one user line: ``<what>: docker: ...``."""
    from docker.errors import DockerException
    try:
        yield
    except DockerException as exc:
        text = getattr(exc, "explanation", None) or str(exc)
        raise LabError(f"{what}: docker: {str(text).strip().splitlines()[-1]}") from None


def image_id(cli, ref: str) -> str | None:
    """The id of a local image, None when the engine does not have it."""
    from docker.errors import ImageNotFound
    try:
        return cli.images.get(ref).id
    except ImageNotFound:
        return None


# Linux capability names by bit number (capability.h)
_CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
         "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
         "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
         "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
         "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
         "CHECKPOINT_RESTORE").split()


def device_access() -> dict:
    """Container options for loop devices, mounts and chroots.

    ``privileged`` where labforge itself holds every capability.  Inside a
    sandbox whose bounding set lacks some (then runc cannot apply "all
    capabilities" and the container does not start), the same access is
    granted explicitly: the capabilities we do hold, every block and char
    device, and no seccomp/AppArmor confinement.
    """
    try:
        text = Path("/proc/self/status").read_text()
        bnd = int(re.search(r"^CapBnd:\s*([0-9a-f]+)", text, re.M).group(1), 16)
    except (OSError, AttributeError, ValueError):
        return {"privileged": True}
    if all(bnd >> bit & 1 for bit in range(len(_CAPS))):
        return {"privileged": True}
    # the ones every Docker engine knows (20.10 predates PERFMON, BPF, ...)
    held = [name for bit, name in enumerate(_CAPS[:38]) if bnd >> bit & 1]
    return {"cap_add": held, "security_opt": ["apparmor=unconfined", "seccomp=unconfined"],
            "device_cgroup_rules": ["b *:* rwm", "c *:* rwm"]}


# --------------------------------------------------------------------------
# the builder image
# --------------------------------------------------------------------------
DIB_VERSION = "3.43.0"             # diskimage-builder in the builder image
OCTAVIA_LIB_VERSION = "3.12.0"     # octavia-lib sdist the agent is installed with
BASE_RELEASE = distros.DEBIAN.amphora_release
BASE_REPO = "labforge/debian-base"
BASE_TAG = f"{BASE_REPO}:{BASE_RELEASE}"
BUILDER_REPO = "labforge/amphora-builder"
DOCKERFILE_DIR = resources.dockerfiles("amphora")
DIB_BIN_DIR = resources.dockerfiles("dib", "bin")
BUILDER_STANDIN_DIR = "/opt/labforge/dib-bin"   # DIB_BIN_DIR inside the builder image
# where the builder image holds Octavia's and labforge's elements and sources
BUILDER_ELEMENTS_PATH = ("/opt/labforge/src/octavia/elements", "/opt/labforge/elements")
BUILDER_SRC = "/opt/labforge/src"
BUILDER_CA = "/usr/local/share/labforge/build-ca.crt"   # build.ca_bundle inside the image


def octavia_source(lab: Lab, s: Mapping | None = None) -> dict:
    """The Octavia source the builder image carries: ``s`` (amphora settings)
    when given, else the lab's octavia.amphora."""
    if s is None:
        a = lab.octavia.amphora
        s = {"octavia_version": a.octavia_version, "octavia_git": a.octavia_git,
             "octavia_ref": a.octavia_ref}
    return {k: s[k] for k in ("octavia_version", "octavia_git", "octavia_ref")}


def builder_inputs(lab: Lab, s: Mapping | None = None) -> dict:
    """Everything the builder image is made from (its tag is a digest of this)."""
    src = octavia_source(lab, s)
    bundle = ca_bundle(lab)
    return {
        "dockerfile": DOCKERFILE_DIR / "Dockerfile",
        "elements": DOCKERFILE_DIR / "elements",
        "bin": DOCKERFILE_DIR / "bin",
        "dib_bin": DIB_BIN_DIR,
        "ca_bundle": bundle if bundle else None,
        "dib_version": DIB_VERSION,
        "octavia_version": None if src["octavia_git"] else src["octavia_version"],
        "octavia_git": src["octavia_git"], "octavia_ref": src["octavia_ref"],
        "octavia_lib_version": OCTAVIA_LIB_VERSION,
        "pip_index": lab.build.pip_index,
    }


def builder_from(lab: Lab) -> str:
    """The image the builder starts FROM: build.builder_from, else the local base."""
    return lab.build.builder_from or BASE_TAG


def builder_tag(lab: Lab, cli, s: Mapping | None = None) -> str | None:
    """Tag of the builder image for these settings when the engine has it, else None.

    No side effects: builds nothing, contacts no package index.
    """
    base_id = image_id(cli, builder_from(lab))
    if base_id is None:
        return None
    tag = f"{BUILDER_REPO}:{input_digest(builder_inputs(lab, s), base_id)[:16]}"
    return tag if image_id(cli, tag) is not None else None


def ensure_builder(lab: Lab, ws: Workspace, cli, s: Mapping | None, logfh, bar) -> str:
    """Tag of the builder image, building it when absent (its build output
    goes to ``logfh``, its steps to ``bar``)."""
    existing = builder_tag(lab, cli, s)
    if existing is not None:
        return existing
    inputs = builder_inputs(lab, s)
    src = octavia_source(lab, s)
    confirm_octavia_release(lab, ws, src)
    base_id = _base_for_builder(lab, ws, cli, bar)
    tag = f"{BUILDER_REPO}:{input_digest(inputs, base_id)[:16]}"
    ctx = Path(tempfile.mkdtemp(prefix="context.", dir=ws.cache_dir("amphora")))
    try:
        shutil.copy2(DOCKERFILE_DIR / "Dockerfile", ctx / "Dockerfile")
        shutil.copytree(DOCKERFILE_DIR / "elements", ctx / "elements")
        shutil.copytree(DOCKERFILE_DIR / "bin", ctx / "bin")
        (ctx / "dib-bin").mkdir()
        if DIB_BIN_DIR.is_dir():
            for f in DIB_BIN_DIR.iterdir():
                if f.is_file():
                    shutil.copy2(f, ctx / "dib-bin" / f.name)
        if inputs["ca_bundle"]:
            shutil.copy2(inputs["ca_bundle"], ctx / "build-ca.crt")
        else:
            (ctx / "build-ca.crt").write_text("")
        args = {"BASE_IMAGE": builder_from(lab), "DIB_VERSION": DIB_VERSION,
                "OCTAVIA_VERSION": src["octavia_version"], "OCTAVIA_LIB_VERSION": OCTAVIA_LIB_VERSION,
                "OCTAVIA_GIT": src["octavia_git"] or "", "OCTAVIA_REF": src["octavia_ref"] or "",
                "PIP_INDEX_URL": lab.build.pip_index or "",
                **proxy_environment()}   # Docker's predefined proxy build args
        bar.set_description(f"builder image {tag}")
        lines: list[str] = []
        for chunk in cli.api.build(path=str(ctx), tag=tag, buildargs=args, rm=True, forcerm=True,
                                   pull=False, decode=True, network_mode="host",
                                   labels={"org.labforge.kind": "amphora-builder"}):
            if "stream" in chunk:
                text = chunk["stream"]
                logfh.write(text)
                logfh.flush()
                lines.extend(ln for ln in text.splitlines() if ln.strip())
                m = re.match(r"Step (\d+/\d+)", text)
                if m:
                    bar.set_description(f"builder image: step {m.group(1)}")
            elif "error" in chunk:
                logfh.write(chunk["error"] + "\n")
                tail = [ln for ln in lines[-extcmd.TAIL_LINES:]]
                raise LabError(f"docker build of {tag} failed: {chunk['error'].strip().splitlines()[-1]}"
                               f"; full log: {logfh.name}", tail)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return tag


def _base_for_builder(lab: Lab, ws: Workspace, cli, bar) -> str:
    """The id of the FROM image: the local base (made when missing) or
    build.builder_from (pulled when the engine does not have it)."""
    ref = builder_from(lab)
    base_id = image_id(cli, ref)
    if base_id is not None:
        return base_id
    if ref == BASE_TAG:
        bar.set_description(f"no {BASE_TAG} yet: builder-base")
        build_builder_base(lab, ws)
    else:
        from docker.errors import DockerException
        bar.set_description(f"pulling {ref}")
        try:
            cli.images.pull(ref)
        except DockerException as exc:
            text = str(getattr(exc, "explanation", None) or exc).strip().splitlines()[-1]
            raise LabError(f"{lab.source.name}: build.builder_from: cannot pull {ref} ({text}); "
                           "name an image your engine has or can pull, or remove the setting "
                           "to use the local base (`invoke builder-base`)") from None
    base_id = image_id(cli, ref)
    if base_id is None:
        raise LabError(f"build.builder_from: the engine has no {ref} after pulling it")
    return base_id


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_builder_base(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Make the local Debian base image (``labforge/debian-base:bookworm``)."""
    t0 = time.monotonic()
    cli = client(ws)
    main, sec = distros.debian_mirrors(lab)
    digest = input_digest("builder-base", 1, BASE_RELEASE, main, sec)
    state_file = ws.cache_dir("builder-base") / "state.json"
    state = _read_json(state_file)
    if not force and state.get("digest") == digest and image_id(cli, BASE_TAG) == state.get("id"):
        return [Outcome("builder-base", "up to date", detail=BASE_TAG)]
    extcmd.require("debootstrap")
    logpath = ws.artifact_dir("logs") / "builder-base.log"
    with BuildLock(ws), open(logpath, "w") as logfh, progress("builder-base", None, "s") as bar, \
            docker_errors("builder-base"):
        work = Path(tempfile.mkdtemp(prefix="base.", dir=ws.cache_dir("builder-base")))
        try:
            root = work / "rootfs"
            bar.set_description(f"debootstrap {BASE_RELEASE} from {main}")
            extcmd.run(["debootstrap", "--variant=minbase", "--include=ca-certificates",
                        BASE_RELEASE, root, main], stdout=logfh, stderr=logfh,
                       what="builder-base: debootstrap")
            (root / "etc/apt/sources.list").write_text(
                f"deb {main} {BASE_RELEASE} main\n"
                f"deb {main} {BASE_RELEASE}-updates main\n"
                f"deb {sec} {BASE_RELEASE}-security main\n")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (root / junk).glob("*"):
                    if p.is_file():
                        p.unlink()
            tarball = work / "rootfs.tar"
            bar.set_description("docker import")
            extcmd.run(["tar", "--numeric-owner", "-C", root, "-cf", tarball, "."],
                       what="builder-base: tar")
            cli.api.import_image_from_file(str(tarball), repository=BASE_REPO, tag=BASE_RELEASE,
                                           changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"])
        finally:
            extcmd.run(["rm", "-rf", "--one-file-system", work], check=False)
    new_id = image_id(cli, BASE_TAG)
    if new_id is None:
        raise LabError(f"builder-base: docker import did not produce {BASE_TAG}; see {logpath}")
    atomic_write(state_file, json.dumps({"digest": digest, "id": new_id, "mirror": main}))
    return [Outcome("builder-base", "built", detail=f"{BASE_TAG} from {main}",
                    seconds=time.monotonic() - t0)]


# --------------------------------------------------------------------------
# the Octavia release the builder image installs
# --------------------------------------------------------------------------
def check_octavia_release(lab: Lab, version: str) -> None:
    """LabError when the package index has no Octavia sdist of that version."""
    import requests
    url = pip_index(lab)
    index = extcmd.safe_url(url)           # what messages show
    bundle = ca_bundle(lab)
    for attempt in range(3):  # an index behind a proxy drops a connection now and then
        try:
            resp = requests.get(f"{url}/octavia/", timeout=60,
                                headers={"Accept": "text/html"},
                                verify=str(bundle) if bundle else True)
        except requests.RequestException as exc:
            if attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise LabError(f"octavia {version}: cannot reach the package index {index} "
                           f"({exc.__class__.__name__}); check the network or build.pip_index") from None
        if resp.status_code < 500 or attempt == 2:
            break
        time.sleep(1 + attempt)
    if resp.status_code == 404:
        raise LabError(f"octavia: the package index {index} has no octavia project; "
                       "check build.pip_index")
    if resp.status_code >= 400:
        raise LabError(f"octavia {version}: {index}/octavia/ answered HTTP {resp.status_code}; "
                       "check build.pip_index")
    found = set(re.findall(r"octavia-(\d[\w.]*?)\.tar\.gz", resp.text))
    if version not in found:
        latest = sorted(found, key=_vkey)[-3:]
        raise LabError(f"octavia {version}: no such Octavia release on {index}; "
                       f"set octavia.amphora.octavia_version (latest: {', '.join(latest) or 'none'})")


def _vkey(v: str):
    return [int(x) if x.isdigit() else -1 for x in re.split(r"[.]", v)]


def release_memo(lab: Lab, ws: Workspace, s: Mapping) -> tuple[Path, str]:
    """The file of confirmed releases and this one's line (index without its password)."""
    return (ws.cache / "amphora" / "octavia-releases",
            f"{extcmd.safe_url(pip_index(lab))} {s['octavia_version']}")


def confirm_octavia_release(lab: Lab, ws: Workspace, s: Mapping) -> None:
    """Check the Octavia release against the package index, unless a build
    with it already succeeded (then a rebuild works without the index).

    Runs before the Docker engine is contacted, so a typo in the version is
    one error line and never starts dockerd.
    """
    if s["octavia_git"]:
        return
    memo, key = release_memo(lab, ws, s)
    try:
        if key in memo.read_text().splitlines():
            return
    except FileNotFoundError:
        pass
    check_octavia_release(lab, s["octavia_version"])


def remember_octavia_release(lab: Lab, ws: Workspace, s: Mapping) -> None:
    """Note a release a build succeeded with (see :func:`confirm_octavia_release`)."""
    memo, key = release_memo(lab, ws, s)
    if s["octavia_git"] or (memo.exists() and key in memo.read_text().splitlines()):
        return
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo, "a") as fh:
        fh.write(key + "\n")
