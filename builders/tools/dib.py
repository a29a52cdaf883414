"""Run diskimage-builder (``disk-image-create``) the way labforge needs it.

The one way labforge runs DIB: :func:`disk_image_create`, used by the base
image build (on the host or in the builder image) and the amphora build (in
the builder image).  A builder gives only its elements, packages, size and
its own settings (``env``); everything else is made here.  It:

* finds ``disk-image-create`` (the project's ``.venv-dib`` made by
  ``scripts/setup.d/dib.sh``, else PATH) and puts its bin dir on PATH, so
  DIB's helpers (dib-run-parts, dib-block-device, element-info) resolve;
* sets the environment DIB needs on these machines: the Debian mirror and
  security mirror of the machine's apt sources (or lab.yaml
  ``build.debian_mirror`` / ``build.debian_security_mirror``), the CA bundle
  of an HTTPS-intercepting proxy (``build.ca_bundle``), an image cache under
  the workspace cache (``DIB_IMAGE_CACHE``, reused between builds) and a
  temp dir on disk;
* on kernels without device-mapper (``/dev/mapper/control`` absent, or
  present but no device-mapper driver in ``/proc/misc``) puts
  ``dockerfiles/dib/bin`` first on PATH: stand-ins for kpartx/dmsetup built
  on ``partx -a`` (and a sudo that keeps PATH).  Where device-mapper exists
  nothing changes;
* streams DIB's output to ``artifacts/logs/<name>.log`` and shows the
  current phase (root.d, install.d, finalise.d, ...) as progress;
* on failure raises one LabError naming the failing element script and
  the log, with DIB's last lines, and leaves no partial output behind;
* compresses qcow2 output itself (:func:`builders.tools.qemu_img.compress_qcow2`):
  DIB runs with ``-u`` and labforge's ``qemu-img convert -c -W`` compresses
  on every core, where DIB's own single-threaded convert took twice as long.

:func:`dib_command` is the one place the command line and environment are
made.  With ``container=InContainer(...)`` the same command runs in a
container (the builder image, which carries the same pinned DIB)
instead of on the host: the workspace cache, the output directory and the CA
bundle are mounted at their host paths so the environment stays valid, /dev
is shared, the stand-ins are the image's copy (put first on PATH by
:func:`in_builder` under the same device-mapper test), elements the image
carries are added by their paths inside it, and the log, progress and
failure line are the host run's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from builders.core import extcmd, resources
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import input_digest
from builders.core.workspace import Workspace
from builders.tools import distros, docker_engine, qemu_img
from builders.tools.buildenv import ca_bundle, proxy_environment

STANDIN_DIR = resources.dockerfiles("dib", "bin")
# the checkout's diskimage-builder virtualenv (scripts/setup.d/dib.sh); None in an installed copy
DIB_VENV = (resources.checkout_dir() / ".venv-dib") if resources.checkout_dir() else None
DEFAULT_DATASOURCES = "NoCloud, ConfigDrive, OpenStack"

_PHASE = re.compile(r"Running hooks from \S*/([a-z-]+)\.d\b")
_SCRIPT = re.compile(r"dib-run-parts Running (\S+)")
_DONE = re.compile(r"dib-run-parts (\S+) completed")
_NOSPACE = re.compile(r"No space left on device|not enough free space", re.I)


def has_device_mapper() -> bool:
    """True when the kernel offers device-mapper (kpartx/dmsetup work).

    ``/dev/mapper/control`` alone is not proof: ``dmsetup mknodes`` (or a
    privileged container) creates that node on kernels without
    device-mapper too.  The kernel lists the driver in /proc/misc when it is
    built in or loaded (/sys/module/dm_mod when it is a module).  Where
    unsure, the partx-based stand-ins are used: they work on any kernel.
    """
    if not Path("/dev/mapper/control").exists():
        return False
    try:
        if "device-mapper" in Path("/proc/misc").read_text():
            return True
    except OSError:
        pass
    return Path("/sys/module/dm_mod").exists()


def dib_executable() -> Path:
    """``disk-image-create``: the checkout's .venv-dib, else next to the
    running Python (an installed copy's virtualenv), else PATH."""
    candidates = [DIB_VENV / "bin" / "disk-image-create"] if DIB_VENV else []
    candidates.append(Path(sys.executable).parent / "disk-image-create")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = shutil.which("disk-image-create")
    if found:
        return Path(found)
    raise LabError("disk-image-create: not found; in a checkout run `bash scripts/setup.sh` "
                   "(its hook scripts/setup.d/dib.sh installs diskimage-builder into .venv-dib), "
                   "else install diskimage-builder (pip) beside labforge or on PATH")


def dib_version() -> str | None:
    """diskimage-builder's version (for manifests and input digests)."""
    try:
        exe = dib_executable()
    except LabError:
        return None
    py = exe.parent / "python"
    if not py.exists():
        return extcmd.tool_version("disk-image-create")
    try:
        proc = extcmd.run([py, "-c", "import importlib.metadata as m;"
                           "print(m.version('diskimage-builder'))"], check=False)
    except LabError:
        return None
    out = proc.stdout.decode().strip()
    return out or None


# --------------------------------------------------------------------------
# the environment
# --------------------------------------------------------------------------
def dib_env(lab: Lab, ws: Workspace, elements: Sequence[str],
            extra: Mapping[str, str] | None = None, *, distro: str = "debian",
            host_ca: bool = True, tmpfs: bool = False) -> dict[str, str]:
    """The environment for one disk-image-create run (without PATH).

    The mirrors of ``distro`` (:mod:`builders.tools.distros`).  ``host_ca``:
    tools trust the CA bundle of build.ca_bundle by its host path (a builder
    whose image carries the bundle itself passes False).  ``tmpfs``: let DIB
    build in RAM (its default) instead of under the workspace cache.
    ``extra`` (the builder's own settings) comes last and wins.
    """
    env = {
        "DIB_IMAGE_CACHE": str(ws.cache_dir("dib", "image-cache")),
        # keep debootstrap's result in the image cache and reuse it: a warm
        # build skips debootstrap (apt's dist-upgrade brings it up to date)
        "DIB_DEBOOTSTRAP_CACHE": "1",
        "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",
        "DIB_SHOW_IMAGE_USAGE": "0",
        "LANG": "C.UTF-8",
    }
    if not tmpfs:
        env["TMP_DIR"] = str(ws.cache_dir("dib", "tmp"))
        env["DIB_NO_TMPFS"] = "1"                       # machines are shared: disk, not RAM
    if distro == "debian":
        main, sec = distros.debian_mirrors(lab)
        env["DIB_DISTRIBUTION_MIRROR"] = main
        env["DIB_DEBIAN_MIRROR"] = main                 # older DIB releases
        env["DIB_DEBIAN_SECURITY_MIRROR"] = sec
    if distros.ubuntu_mirror(lab):
        env["DIB_UBUNTU_MIRROR"] = distros.ubuntu_mirror(lab)
        if distro == "ubuntu":
            env["DIB_DISTRIBUTION_MIRROR"] = distros.ubuntu_mirror(lab)
    if "cloud-init-datasources" in elements:
        env["DIB_CLOUD_INIT_DATASOURCES"] = DEFAULT_DATASOURCES
    bundle = ca_bundle(lab)
    if bundle is not None and host_ca:
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "PIP_CERT"):
            env[var] = str(bundle)
    if lab.build.pip_index:
        env["PIP_INDEX_URL"] = lab.build.pip_index
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class DibCommand:
    """One disk-image-create run: argv, environment (without PATH), result."""
    argv: list[str]
    env: dict[str, str]
    built: Path                       # the image DIB writes when it succeeds


def dib_command(lab: Lab, ws: Workspace, *, exe: str, elements: Sequence[str], workdir: Path,
                image_type: str = "qcow2", packages: Sequence[str] = (),
                image_size: int | None = None, elements_path: Sequence[Path | str] = (),
                env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                distro: str = "debian", host_ca: bool = True, tmpfs: bool = False,
                arch: str | None = None) -> DibCommand:
    """The one place the DIB command line is made, on the host or in a container.

    Only ``exe`` differs between the two: the environment names workspace
    paths, which a container run mounts at the same paths.  ``elements_path``
    holds host paths and, for a container run, paths inside the image.
    """
    full_env = dib_env(lab, ws, elements, env, distro=distro, host_ca=host_ca, tmpfs=tmpfs)
    if elements_path:
        full_env["ELEMENTS_PATH"] = os.pathsep.join(str(p) for p in elements_path)
    argv = [exe, "-t", image_type, "-o", str(workdir / "image")]
    if not tmpfs:
        argv.append("--no-tmpfs")
    if arch:
        argv += ["-a", arch]
    if image_type == "qcow2":
        argv.append("-u")                       # compressed by disk_image_create, on every core
    if image_size:
        argv += ["--image-size", str(image_size)]
    if packages:
        argv += ["-p", ",".join(packages)]
    argv += [*extra_args, *elements]
    return DibCommand(argv, full_env, workdir / f"image.{image_type}")


@dataclass(frozen=True)
class InContainer:
    """Where a container run happens: a connected DockerClient, the image,
    the PATH inside (stand-ins first when needed), extra create options
    (device access) and the element directories the image carries (paths
    inside it, added to ELEMENTS_PATH, never mounted)."""
    cli: Any
    image: str
    path: str
    options: Mapping[str, Any] = field(default_factory=dict)
    elements_path: tuple[str, ...] = ()


def in_builder(cli, tag: str, elements_path: Sequence[str] = ()) -> InContainer:
    """A run in the builder image ``tag`` (see :mod:`builders.tools.docker_engine`):
    its PATH, with the kpartx/dmsetup stand-ins first on kernels without
    device-mapper (the container shares the host's kernel, so the host's test
    decides), device access, and ``elements_path``: element directories inside
    the image to search (e.g. ``docker_engine.BUILDER_ELEMENTS_PATH``)."""
    return InContainer(cli, tag, builder_path(docker_engine.image_path_env(cli, tag)),
                       docker_engine.device_access(), tuple(elements_path))


def builder_path(image_path: str) -> str:
    """The PATH of a run in the builder image whose own PATH is ``image_path``:
    the kpartx/dmsetup stand-ins first on kernels without device-mapper."""
    if has_device_mapper():
        return image_path
    return f"{docker_engine.BUILDER_STANDIN_DIR}:{image_path}"


def disk_image_create(lab: Lab, ws: Workspace, *, name: str, elements: Sequence[str],
                      output: Path, image_type: str = "qcow2", packages: Sequence[str] = (),
                      image_size: int | None = None, elements_path: Sequence[Path] = (),
                      env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                      label: str | None = None, container: InContainer | None = None,
                      distro: str = "debian", host_ca: bool = True, tmpfs: bool = False,
                      arch: str | None = None, no_space: str | None = None) -> Path:
    """Build ``output`` with disk-image-create; return the log path.

    ``name`` names the log (``artifacts/logs/<name>.log``).  ``output`` is
    written atomically: DIB builds into a temporary directory next to it
    and the image is renamed into place only when DIB succeeded.  With
    ``container`` DIB runs in that image instead of on the host, with the
    same argv and environment (see :func:`_run_in_container`).
    ``no_space`` ends the message when the image ran out of space (which
    setting to raise).  See :func:`dib_env` for ``distro``, ``host_ca``
    and ``tmpfs``.
    """
    if container is None:
        exe = str(dib_executable())
        if os.geteuid() != 0:
            raise LabError(f"{name}: diskimage-builder needs root (loop devices, chroot, mount); "
                           "run the task as root")
        for tool in ("qemu-img", "debootstrap"):
            extcmd.require(tool)
    else:
        exe = "disk-image-create"         # on the builder image's PATH
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = ws.artifact_dir("logs") / f"{name}.log"
    what = label or name

    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".dib", dir=output.parent))
    try:
        search = [*elements_path, *(container.elements_path if container else ())]
        cmd = dib_command(lab, ws, exe=exe, elements=elements, workdir=workdir,
                          image_type=image_type, packages=packages, image_size=image_size,
                          elements_path=search, env=env, extra_args=extra_args,
                          distro=distro, host_ca=host_ca, tmpfs=tmpfs, arch=arch)
        with progress(label or f"{name}: diskimage-builder", None, unit="phase") as bar:
            if container is None:
                code = _run_on_host(cmd, log_path, bar, what)
            else:
                code = _run_in_container(container, cmd, lab, ws, output, log_path, bar,
                                         elements_path)
        if code != 0 or not cmd.built.exists():
            raise _failure(what, log_path, code, no_space)
        built = cmd.built
        if image_type == "qcow2":
            with progress(f"{what}: compressing", None, unit="s"):
                qemu_img.compress_qcow2(built, workdir / "compressed.qcow2", what=what)
            built = workdir / "compressed.qcow2"
        os.chmod(built, 0o644)
        os.replace(built, output)
    finally:
        # DIB's own temp dirs are under TMP_DIR (cache/dib/tmp) and removed by
        # DIB; ours holds only the image being built.  A previous good output
        # is never touched on failure.
        shutil.rmtree(workdir, ignore_errors=True)
    return log_path


MMDEBSTRAP_HOOKS = "/usr/share/mmdebstrap/hooks"

# What the debian-minimal and base elements install in every Debian image,
# for package layers (the base image's and the amphora's add their
# elements' packages).  Only packages DIB installs anyway belong in a layer;
# the grub bootloader never does (DIB installs it in finalise, on the disk).
DEBIAN_MINIMAL_LAYER = (
    "systemd-sysv", "busybox", "sudo", "gnupg2", "python3",            # debian-minimal root.d
    # ... and what apt recommends for those (debian-minimal installs them
    # before DIB turns Recommends off; mmdebstrap installs no Recommends)
    "systemd-timesyncd", "libnss-systemd", "dbus-user-session", "libsasl2-modules",
    "libldap-common", "krb5-locales", "libgpm2",
    "lsb-release", "apt-transport-https", "software-properties-common",  # baseline tools
    "open-iscsi",                                                      # base (iscsi_package)
    "linux-image-amd64", "netbase",                                    # debian-minimal install.d
)


def package_layer(codename: str, main: str, sec: str, packages: Sequence[str]) -> tuple[str, str]:
    """A cached package layer: (its image cache directory name, DIB_MMDEBSTRAP_EXTRA_ARGS).

    DIB bootstraps with mmdebstrap when it is installed and caches the root
    as its "debootstrap" tarball in DIB_IMAGE_CACHE.  These arguments make
    that root hold ``packages`` already (apt resolves --include, where
    debootstrap's resolver fails on such sets), taken from the release, its
    updates and its security suite, so a later build's dist-upgrade and
    package installs have nothing to redo.  The root is merged-/usr the way
    debootstrap makes it (usr-is-merged, not usrmerge and perl).  DIB names
    its tarball by release and arch only, so each mirror and package list
    gets its own directory: a changed list starts a new layer, never a stale one.
    """
    key = input_digest("dib/layer", codename, main, sec, list(packages))[:12]
    suites = (f"deb {main} {codename}-updates main", f"deb {sec} {codename}-security main")
    hook = "printf '%s\\n' " + " ".join(f"'{s}'" for s in suites) + ' >> "$1/etc/apt/sources.list"'
    # DIB pastes this into `sh -c "mmdebstrap ... $DIB_MMDEBSTRAP_EXTRA_ARGS ..."`
    args = (f"--include={','.join(packages)} --setup-hook={shlex.quote(hook)} "
            f"--hook-dir={MMDEBSTRAP_HOOKS}/merged-usr")
    return f"{codename}-{key}", args


def prune_layers(current: Path) -> None:
    """Drop the other layers of ``current``'s release (hundreds of MB each)."""
    codename = current.name.rsplit("-", 1)[0]
    for other in current.parent.glob(f"{codename}-*"):
        if other != current and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _run_on_host(cmd: DibCommand, log_path: Path, bar, what: str) -> int:
    """disk-image-create as a child process; the phase is read from its log."""
    full_env = dict(cmd.env)
    path = [str(Path(cmd.argv[0]).parent), os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]
    if not has_device_mapper():
        path.insert(0, str(STANDIN_DIR))
    full_env["PATH"] = os.pathsep.join(path)
    result: dict = {}

    def work() -> None:
        with open(log_path, "wb") as fh:
            fh.write(("# " + extcmd.display(cmd.argv) + "\n").encode())
            fh.flush()
            try:
                result["proc"] = extcmd.run(cmd.argv, env=full_env, stdout=fh,
                                            stderr=subprocess.STDOUT, check=False, what=what)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller thread
                result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    phase = None
    try:
        while thread.is_alive():
            thread.join(2.0)
            now = _current_phase(log_path)
            if now and now != phase:
                phase = now
                bar.set_description(phase)
    except KeyboardInterrupt:
        # the terminal's Ctrl-C reaches DIB too; its EXIT trap unmounts
        # the chroot and frees the loop device (killing it from here
        # could leave mounts behind).  Its output dir is removed by the caller.
        extcmd.log.info("%s: interrupted; diskimage-builder cleans up after itself "
                        "(log: %s)", what, log_path)
        raise
    if "error" in result:
        raise result["error"]
    return result["proc"].returncode


def container_mounts(lab: Lab, ws: Workspace, output: Path,
                     elements_path: Sequence[Path] = ()) -> dict[str, dict[str, str]]:
    """Volumes for a container run: every host path the DIB command names,
    at the same path inside (so DIB_IMAGE_CACHE, TMP_DIR, -o and the CA
    bundle stay valid), and /dev for loop devices."""
    vols = {"/dev": {"bind": "/dev", "mode": "rw"},
            str(ws.cache): {"bind": str(ws.cache), "mode": "rw"},
            str(output.parent): {"bind": str(output.parent), "mode": "rw"}}
    bundle = ca_bundle(lab)
    for p in [*([bundle] if bundle else []), *elements_path]:
        p = Path(p).resolve()
        vols.setdefault(str(p), {"bind": str(p), "mode": "ro"})
    return vols


def _run_in_container(c: InContainer, cmd: DibCommand, lab: Lab, ws: Workspace, output: Path,
                      log_path: Path, bar, elements_path: Sequence[Path] = ()) -> int:
    """disk-image-create in ``c.image``: privileged-equivalent device access,
    host network, the workspace paths mounted where they are on the host;
    its output streams to the log and drives the phase shown.  Ctrl-C kills
    the container (its mounts die with its mount namespace)."""
    env = proxy_environment()
    env.update(cmd.env)
    env["PATH"] = c.path
    tracker = Phases()

    def on_line(line: str) -> None:
        before = tracker.text
        tracker.feed(line)
        if tracker.text and tracker.text != before:
            bar.set_description(tracker.text)

    with open(log_path, "w", encoding="utf-8", errors="replace") as fh:
        fh.write("# " + extcmd.display(cmd.argv) + f"  (in container {c.image})\n")
        fh.flush()
        code, _ = docker_engine.run_streaming(
            c.cli, c.image, list(cmd.argv), logfh=fh, on_line=on_line, keep=200,
            environment=env, network_mode="host", working_dir="/",
            volumes=container_mounts(lab, ws, output, [Path(p) for p in elements_path]),
            labels={"org.labforge.kind": "dib-build"}, **dict(c.options))
    return code


def _read_tail(path: Path, size: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(0, end - size))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()


class Phases:
    """DIB's current phase and element script, fed its output line by line."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.script: str | None = None

    def feed(self, line: str) -> None:
        m = _PHASE.search(line)
        if m:
            self.phase, self.script = m.group(1) + ".d", None
        m = _SCRIPT.search(line)
        if m:
            self.script = Path(m.group(1)).name
            self.phase = Path(m.group(1)).parent.name or self.phase
        if "Converting image using qemu-img" in line:
            self.phase, self.script = "converting the image (qemu-img convert)", None

    @property
    def text(self) -> str | None:
        """'install.d: 50-cloud-init'"""
        if self.phase is None:
            return None
        return f"{self.phase}: {self.script}" if self.script else self.phase


def _current_phase(log_path: Path) -> str | None:
    """'install.d: 50-cloud-init' from the last lines of a DIB log."""
    tracker = Phases()
    for line in _read_tail(log_path, 64 * 1024):
        tracker.feed(line)
    return tracker.text


def failing_script(lines: Sequence[str]) -> str | None:
    """The element script that was running when DIB stopped (no 'completed')."""
    running: str | None = None
    for line in lines:
        m = _SCRIPT.search(line)
        if m:
            running = m.group(1)
            continue
        m = _DONE.search(line)
        if m and running and Path(running).name == m.group(1):
            running = None
    if running is None:
        return None
    p = Path(running)
    return f"{p.parent.name}/{p.name}"


def _failure(what: str, log_path: Path, code: int, no_space: str | None = None) -> LabError:
    lines = _read_tail(log_path)
    stamp = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ \| ")
    tail = [t for t in (stamp.sub("", ln.rstrip()) for ln in lines)
            if t.strip() and "PROFILING" not in t and "INFO diskimage_builder" not in t
            and not t.startswith("+") and "Sourcing environment file" not in t]
    tail = tail[-extcmd.TAIL_LINES:]
    if no_space and any(_NOSPACE.search(ln) for ln in lines[-200:]):
        return LabError(f"{what}: the image ran out of space {no_space}; full log: {log_path}", tail)
    script = failing_script(lines)
    where = f"element script {script} failed" if script else f"disk-image-create exited {code}"
    return LabError(f"{what}: {where}; full log: {log_path}", tail)
