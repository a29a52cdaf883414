"""Run a VM under QEMU with a serial console: the one harness every boot check uses.

A check describes its VM (:class:`VmSpec`: disks, NICs, memory, CPUs) and
what "booted" means for it (a ``probe`` called while the VM runs: a marker
on the console, an agent answering on a forwarded port, ...).  :func:`boot`
does the rest:

* builds the QEMU command line (:func:`qemu_argv`): disks (a disk marked
  ``throwaway`` boots from a fresh qcow2 overlay in the work directory, so
  the image itself is only read), NICs (QEMU user networking with host
  port forwards, or any other netdev, each NIC with its own options), the
  serial console written to a file, a pid file;
* picks the accelerator (:func:`accel_plan`): KVM when it can run a guest
  here, with TCG behind it, because some nested hosts run the firmware
  under KVM and then stall once the kernel starts: a boot that shows no
  kernel output within ``KVM_GRACE`` seconds (or whose QEMU aborts) is
  stopped and redone under TCG, and the stall is remembered for this
  process and, per kernel and QEMU, in the workspace's cache/, so later
  runs skip the KVM try (:func:`kvm_stalled`).  ``LABFORGE_ACCEL=kvm|tcg``
  or an explicit accelerator decides instead;
* starts QEMU, polls the console and the probe, shows the boot stage as
  progress, and stops at the probe's answer, at QEMU's exit (an error with
  QEMU's last stderr lines and the console's last lines) or at the timeout;
* always stops the QEMU it started (SIGTERM, then SIGKILL), on success,
  failure, any exception and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from builders.core import extcmd
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.workspace import Workspace
from builders.tools import qemu_img

log = logging.getLogger("labforge")

QEMU = "qemu-system-x86_64"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TAIL = 15
# A KVM guest's kernel prints "Linux version" within seconds of QEMU's start
# (firmware and GRUB included).  Some nested hosts run the firmware under KVM
# and then stall for good once the kernel starts; a boot that shows no
# kernel output by then is stopped and redone under TCG.
KVM_GRACE = 45.0
_kvm_stall: list[str] = []          # why KVM stalled in this process (then: TCG only)
STALL_MEMO = "kvm-stalls"           # cache/<this>: the same, for later runs on this host


# --------------------------------------------------------------------------
# the accelerator
# --------------------------------------------------------------------------
def _host_key() -> str:
    """What a KVM stall depends on: this kernel and this QEMU."""
    qemu = shutil.which(QEMU) or "-"
    return f"{os.uname().release} {qemu} {extcmd.tool_version(QEMU)}"


def _memo_says_stalled(ws: Workspace) -> bool:
    try:
        return _host_key() in (ws.cache / STALL_MEMO).read_text().splitlines()
    except OSError:
        return False


def _stalled_before(ws: Workspace | None) -> bool:
    return bool(_kvm_stall) or (ws is not None and _memo_says_stalled(ws))


def detect_accel(ws: Workspace | None = None) -> str:
    """``kvm`` when KVM can run a guest here, else ``tcg``.

    ``LABFORGE_ACCEL=kvm|tcg`` decides; otherwise the probe below, unless a
    boot already saw KVM stall on this kernel and QEMU (:func:`kvm_stalled`;
    remembered for this process and in the workspace's cache/).
    """
    forced = os.environ.get("LABFORGE_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    return "tcg" if _stalled_before(ws) else _probe_kvm()


def accel_plan(accel: str | None = None, ws: Workspace | None = None) -> list[str]:
    """The accelerators a boot tries, in order.

    An explicit ``accel`` (option or LABFORGE_ACCEL) is used alone.  A
    detected KVM comes with TCG behind it, because the probe only proves the
    firmware runs: a boot watches for kernel output for ``KVM_GRACE``
    seconds and otherwise starts over under TCG.
    """
    if accel:
        if accel not in ("kvm", "tcg"):
            raise LabError(f"--accel: {accel!r} is not kvm or tcg")
        return [accel]
    if os.environ.get("LABFORGE_ACCEL", "").strip().lower() in ("kvm", "tcg"):
        return [detect_accel()]
    return ["kvm", "tcg"] if detect_accel(ws) == "kvm" else ["tcg"]


def kvm_stalled(what: str, ws: Workspace | None = None) -> None:
    """Record that a KVM boot made no progress; later boots here use TCG."""
    if not _kvm_stall:
        log.warning("%s: KVM showed no guest kernel output within %.0fs (nested KVM that "
                    "stalls); redoing the boot under TCG, and using TCG from now on "
                    "(LABFORGE_ACCEL=kvm to insist)", what, KVM_GRACE)
    _kvm_stall.append(what)
    if ws is not None and not _memo_says_stalled(ws):
        with contextlib.suppress(OSError):
            with open(ws.cache_dir() / STALL_MEMO, "a") as fh:
                fh.write(_host_key() + "\n")


def kernel_started(console_text: str) -> bool:
    return "Linux version" in console_text


def _kvm_is_pvm(modules: Path = Path("/sys/module")) -> bool:
    """/dev/kvm comes from PVM, not from VT-x or AMD-V."""
    return (modules / "kvm_pvm").is_dir() and not any(
        (modules / m).is_dir() for m in ("kvm_intel", "kvm_amd"))


@functools.lru_cache(maxsize=None)
def _probe_kvm() -> str:
    """``/dev/kvm`` existing is not enough (nested or restricted hosts abort or
    hang): a firmware-only guest with ``-cpu host`` must reach SeaBIOS's
    "no bootable device" and exit within seconds.  A KVM without hardware
    virtualization (the PVM module, ``kvm_pvm``, with neither ``kvm_intel``
    nor ``kvm_amd``) passes that probe but runs only PVM guest kernels: a
    stock cloud image's kernel stalls there, so it counts as no KVM."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(QEMU) is None:
        return "tcg"
    if _kvm_is_pvm():
        return "tcg"
    with tempfile.TemporaryDirectory(prefix="labforge-kvm-") as tmp:
        bios = Path(tmp) / "bios.log"
        try:
            proc = extcmd.run([QEMU, "-accel", "kvm", "-cpu", "host",
                               "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none",
                               "-no-reboot", "-boot", "reboot-timeout=0",
                               "-chardev", f"file,id=dbg,path={bios}",
                               "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
                              timeout=20, check=False, what="probing KVM")
        except LabError:
            return "tcg"
        text = bios.read_text(errors="replace") if bios.exists() else ""
        return "kvm" if proc.returncode == 0 and "No bootable device" in text else "tcg"


# --------------------------------------------------------------------------
# the VM
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Drive:
    path: Path
    format: str = "qcow2"
    interface: str = "virtio"          # virtio | ide
    cdrom: bool = False                # read-only IDE CD-ROM (seed ISO, config drive)
    throwaway: bool = False            # boot a fresh qcow2 overlay of it; the file is only read


@dataclass(frozen=True)
class Nic:
    """One NIC: a QEMU ``-netdev`` (``user``, ``socket``, ``tap``, ... with
    its own options) and the guest device on it."""
    netdev: str = "user"
    options: tuple[str, ...] = ()      # netdev options: "hostfwd=tcp:127.0.0.1:8443-:443", "net=..."
    mac: str | None = None
    model: str = "virtio-net-pci"

    @classmethod
    def user(cls, *, mac: str | None = None, forwards: Sequence[tuple] = (),
             options: Sequence[str] = (), model: str = "virtio-net-pci") -> "Nic":
        """QEMU user networking; ``forwards``: (proto, host port, guest port), the
        host side bound to 127.0.0.1.  The guest reaches the host's 127.0.0.1 at
        the network's gateway (10.0.2.2 unless ``net=`` says otherwise)."""
        fwd = tuple(f"hostfwd={proto}:127.0.0.1:{host}-:{guest}" for proto, host, guest in forwards)
        return cls("user", (*options, *fwd), mac, model)


@dataclass(frozen=True)
class VmSpec:
    name: str
    drives: tuple[Drive, ...]
    nics: tuple[Nic, ...] = (Nic(),)
    memory: int = 1024                 # MiB
    cpus: int = 1
    cpus_tcg: int | None = None        # under TCG (each vCPU is a host thread); default: cpus
    machine: str | None = None         # e.g. "pc"; None: QEMU's default
    rng: bool = False                  # a virtio RNG (entropy for early TLS)
    extra: tuple[str, ...] = ()


def qemu_argv(spec: VmSpec, accel: str, console: Path, pidfile: Path,
              drives: Sequence[Drive] | None = None) -> list[str]:
    """The QEMU command line for ``spec`` (``drives``: the ones actually booted)."""
    cpus = spec.cpus_tcg if accel == "tcg" and spec.cpus_tcg else spec.cpus
    argv = [QEMU, "-name", spec.name, "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else []),
            *(["-M", spec.machine] if spec.machine else []),
            "-smp", str(max(1, cpus)), "-m", str(spec.memory),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}", "-pidfile", str(pidfile)]
    for d in drives if drives is not None else spec.drives:
        opts = [f"file={d.path}", f"format={d.format}", f"if={'ide' if d.cdrom else d.interface}"]
        opts += ["media=cdrom", "readonly=on"] if d.cdrom else ["cache=unsafe"]
        argv += ["-drive", ",".join(opts)]
    for i, n in enumerate(spec.nics):
        argv += ["-netdev", ",".join([n.netdev, f"id=n{i}", *n.options]),
                 "-device", ",".join([n.model, f"netdev=n{i}", *([f"mac={n.mac}"] if n.mac else [])])]
    if spec.rng:
        argv += ["-device", "virtio-rng-pci"]
    return [*argv, *spec.extra]


def clean(text: str) -> str:
    """Console text without ANSI escapes and carriage returns."""
    return ANSI.sub("", text).replace("\r", "")


def tail(text: str, n: int = TAIL) -> list[str]:
    lines = [ln.rstrip() for ln in clean(text).splitlines() if ln.strip()]
    return lines[-n:]


class Vm:
    """One running QEMU (started by :meth:`start`, always stopped by :meth:`stop`)."""

    def __init__(self, argv: list[str], console: Path, pidfile: Path, stderr: Path, accel: str):
        self.argv, self.console, self.pidfile, self.stderr_path = argv, console, pidfile, stderr
        self.accel = accel
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> "Vm":
        self.console.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        log.debug("run: %s", extcmd.display(self.argv))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([extcmd.require(self.argv[0]), *self.argv[1:]],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        self.started = time.monotonic()
        return self

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def text(self) -> str:
        """The serial console so far, cleaned."""
        try:
            return clean(self.console.read_text(errors="replace"))
        except OSError:
            return ""

    def stderr_tail(self, n: int = 3) -> list[str]:
        try:
            return tail(self.stderr_path.read_text(errors="replace"), n)
        except OSError:
            return []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; waits for QEMU to be gone."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()

    def __enter__(self) -> "Vm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Booted:
    result: Any                        # what the probe answered
    accel: str
    seconds: float                     # from QEMU's start to the probe's answer
    console: Path


@dataclass
class Watch:
    """What a boot waits for and how it reports."""
    probe: Callable[[Vm], Any]                         # not None: booted; may raise LabError
    waiting_for: str = "the guest was ready"           # "... qemu exited before <this>"
    stage: Callable[[str], str] = lambda text: "booting"  # console text -> progress label
    timeout_error: Callable[[Vm, float], LabError] | None = None
    interval: float = 1.0                              # seconds between probes
    on_start: Callable[[Vm], None] | None = None       # e.g. start a listener for the guest


def require_tools() -> None:
    """QEMU and qemu-img, or the one-line error that says what to install."""
    extcmd.require(QEMU)
    extcmd.require("qemu-img")


def boot(spec: VmSpec, watch: Watch, *, what: str, console: Path, timeout: float,
         accel: str | None = None, ws: Workspace | None = None,
         workdir: Path | None = None) -> Booted:
    """Boot ``spec`` until ``watch.probe`` answers (see the module doc)."""
    extcmd.require(QEMU)
    if any(d.throwaway for d in spec.drives):
        extcmd.require("qemu-img")
    plan = accel_plan(accel, ws)
    parent = workdir if workdir is not None else (ws.cache_dir("vm") if ws is not None else None)
    tmp = Path(tempfile.mkdtemp(prefix=f"{spec.name}.", dir=parent))
    os.chmod(tmp, 0o700)                       # a config drive may hold a private key
    try:
        for i, acc in enumerate(plan):
            drives = _fresh_drives(spec, tmp)
            argv = qemu_argv(spec, acc, console, tmp / "qemu.pid", drives)
            grace = KVM_GRACE if i + 1 < len(plan) else None
            vm = Vm(argv, console, tmp / "qemu.pid", tmp / "qemu.stderr", acc)
            with vm:
                booted = _watch(vm, watch, what, timeout, grace)
            if booted is not None:
                return booted
            kvm_stalled(what, ws)
        raise AssertionError("unreachable: the last accelerator has no grace period")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_drives(spec: VmSpec, tmp: Path) -> list[Drive]:
    out = []
    for i, d in enumerate(spec.drives):
        if d.throwaway:
            overlay = tmp / f"disk{i}.qcow2"
            overlay.unlink(missing_ok=True)
            qemu_img.create_overlay(overlay, Path(d.path).resolve(), backing_format=d.format,
                                    what="creating the throwaway overlay")
            d = Drive(overlay, "qcow2", d.interface, d.cdrom, False)
        out.append(d)
    return out


def _watch(vm: Vm, watch: Watch, what: str, timeout: float, grace: float | None) -> Booted | None:
    """The boot's outcome; None when ``grace`` passed (or QEMU quit) before the
    guest kernel printed anything, so the caller can try the next accelerator."""
    if watch.on_start is not None:
        watch.on_start(vm)
    with progress(f"{what} ({vm.accel})", None, unit="s") as bar:
        stage = None
        next_probe = 0.0
        while True:
            text = vm.text()
            now = watch.stage(text)
            if now != stage:
                stage = now
                bar.set_description(now)
            if grace is not None and not kernel_started(text) and (
                    not vm.alive() or vm.elapsed > grace):
                if not vm.alive():
                    log.info("%s: KVM is not usable here (%s)", what,
                             (vm.stderr_tail(1) or [f"qemu exited {vm.returncode}"])[-1])
                return None
            exited = not vm.alive()
            if exited or time.monotonic() >= next_probe:
                result = watch.probe(vm)      # once more after an exit: it may have just passed
                if result is not None:
                    return Booted(result, vm.accel, vm.elapsed, vm.console)
                next_probe = time.monotonic() + watch.interval
            if exited:
                text = vm.text()
                raise LabError(f"{what}: qemu exited (status {vm.returncode}) before "
                               f"{watch.waiting_for}; console: {vm.console}",
                               [*vm.stderr_tail(), *tail(text)])
            if vm.elapsed > timeout:
                if watch.timeout_error is not None:
                    raise watch.timeout_error(vm, timeout)
                raise LabError(f"{what}: {watch.waiting_for} did not happen within "
                               f"{timeout:.0f}s ({vm.accel}); console: {vm.console}",
                               tail(text) or ["(the serial console is still empty)"])
            time.sleep(min(1.0, watch.interval))
