"""Boot a host's disk under QEMU and prove that cloud-init applied its seed.

``boot_check`` boots a throwaway overlay on top of the host's overlay
(``artifacts/vms/<host>.qcow2`` is only read, never written) with the
host's seed ISO as a CD-ROM, watches the serial console and passes when

* cloud-init reports its final stage done (``Cloud-init v. ... finished at``),
* the seed's marker line (:func:`builders.artifacts.seed.seed_marker`, printed by
  the seed's last runcmd) appeared, and
* every ``expect`` text appeared (for checks a lab adds to runcmd, e.g. the
  hostname or a written file printed to the console).

It times out with the last console lines.  KVM is used when it can run a
guest here, otherwise TCG (see :func:`accel_plan`); ``LABFORGE_ACCEL=kvm|tcg``
overrides the detection.  The console of the last boot is kept in
``artifacts/logs/boot-<host>.console.log``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from builders.core import extcmd
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.lab import Host, Lab
from builders.core.outcome import Outcome
from builders.artifacts.overlays import overlay_path
from builders.core.workspace import Workspace

log = logging.getLogger("labforge")

FINAL = re.compile(r"Cloud-init v\. \S+ finished at .*?Up ([\d.]+) seconds")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TAIL = 15
# A KVM guest's kernel prints "Linux version" within seconds of QEMU's start
# (firmware and GRUB included).  Some nested hosts run the firmware under KVM
# and then stall for good once the kernel starts; a boot that shows no
# kernel output by then is stopped and redone under TCG.
KVM_GRACE = 45.0
_kvm_stall: list[str] = []          # why KVM stalled in this process (then: TCG only)
STALL_MEMO = "kvm-stalls"           # cache/<this>: the same, for later runs on this host


def _host_key() -> str:
    """What a KVM stall depends on: this kernel and this QEMU."""
    qemu = shutil.which("qemu-system-x86_64") or "-"
    return f"{os.uname().release} {qemu} {extcmd.tool_version('qemu-system-x86_64')}"


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


@functools.lru_cache(maxsize=None)
def _probe_kvm() -> str:
    """``/dev/kvm`` existing is not enough (nested or restricted hosts abort or
    hang): a firmware-only guest with ``-cpu host`` must reach SeaBIOS's
    "no bootable device" and exit within seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None:
        return "tcg"
    with tempfile.TemporaryDirectory(prefix="labforge-kvm-") as tmp:
        log = Path(tmp) / "bios.log"
        try:
            proc = extcmd.run(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host",
                               "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none",
                               "-no-reboot", "-boot", "reboot-timeout=0",
                               "-chardev", f"file,id=dbg,path={log}",
                               "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
                              timeout=20, check=False, what="probing KVM")
        except LabError:
            return "tcg"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "kvm" if proc.returncode == 0 and "No bootable device" in text else "tcg"


def _seed(lab: Lab, ws: Workspace, host: Host) -> tuple[Path, str]:
    try:
        from builders.artifacts import seed as seediso
    except ImportError:  # pragma: no cover - the seed module is another feature
        raise LabError("boot-check: the seed ISO builder (builders/artifacts/seed/) is missing") from None
    path = seediso.seed_path(lab, ws, host)
    if not path.is_file():
        raise LabError(f"{path}: no seed for {host.name}; run `invoke seed-iso` first")
    return path, seediso.seed_marker(lab, host, ws)


def _clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def _tail(text: str, n: int = TAIL) -> list[str]:
    lines = [ln.rstrip() for ln in _clean(text).splitlines() if ln.strip()]
    return lines[-n:]


def boot_check(lab: Lab, ws: Workspace, host: str, *, timeout: float = 900,
               expect: Sequence[str] = (), accel: str | None = None,
               memory: int = 1024) -> list[Outcome]:
    """Boot ``host`` from a throwaway overlay and wait for cloud-init and the marker."""
    h = lab.host(host)
    overlay = overlay_path(ws, h)
    if not overlay.is_file():
        raise LabError(f"{overlay}: no overlay for {h.name}; run `invoke overlays` first")
    seed, marker = _seed(lab, ws, h)
    extcmd.require("qemu-system-x86_64")
    extcmd.require("qemu-img")
    plan = accel_plan(accel, ws)
    console = ws.artifact_dir("logs") / f"boot-{h.name}.console.log"
    workdir = Path(tempfile.mkdtemp(prefix=f"boot-{h.name}.", dir=ws.cache_dir("boot-check")))
    disk = workdir / "disk.qcow2"
    pidfile = workdir / "qemu.pid"
    try:
        for i, acc in enumerate(plan):
            console.unlink(missing_ok=True)
            disk.unlink(missing_ok=True)
            extcmd.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", overlay.resolve(),
                        "-F", "qcow2", disk], what="creating the throwaway overlay")
            argv = ["qemu-system-x86_64", "-name", f"labforge-boot-{h.name}",
                    "-accel", acc, *(["-cpu", "host"] if acc == "kvm" else []),
                    "-smp", str(min(h.cpus, os.cpu_count() or 1, 2)), "-m", str(min(memory, h.memory)),
                    "-nodefaults", "-display", "none", "-no-reboot",
                    "-serial", f"file:{console}",
                    "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe",
                    "-drive", f"file={seed},media=cdrom,readonly=on,format=raw",
                    *_nic_args(h),
                    "-pidfile", str(pidfile)]
            grace = KVM_GRACE if i + 1 < len(plan) else None
            out = _watch(h, argv, console, pidfile, marker, list(expect), timeout, acc, grace)
            if out is not None:
                return [out]
            kvm_stalled(f"boot-check {h.name}", ws)
        raise AssertionError("unreachable: the last accelerator has no grace period")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _nic_args(h: Host) -> list[str]:
    """One user-mode NIC per lab NIC, with its MAC (the seed's network-config
    matches NICs by MAC; a host with several NICs has them all)."""
    if len(h.nics) > 1:
        return [a for n in h.nics for a in ("-nic", f"user,model=virtio-net-pci,mac={n.mac}")]
    return ["-nic", "user,model=virtio-net-pci" + (f",mac={h.mac}" if h.mac else "")]


def _watch(h: Host, argv: list[str], console: Path, pidfile: Path, marker: str,
           expect: list[str], timeout: float, accel: str, grace: float | None) -> Outcome | None:
    """The boot's outcome; None when ``grace`` passed (or QEMU quit) before the
    guest kernel printed anything, so the caller can try the next accelerator."""
    result: dict = {}

    def work() -> None:
        try:
            result["proc"] = extcmd.run(argv, timeout=timeout + 120, check=False,
                                        what=f"boot-check {h.name}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    start = time.monotonic()
    thread.start()
    step = f"boot-check {h.name}"
    text = ""
    final_at = None
    try:
        with progress(f"{step} ({accel})", None, unit="s") as bar:
            stage = None
            while True:
                thread.join(1.0)
                with contextlib.suppress(OSError):
                    text = _clean(console.read_text(errors="replace"))
                now = _stage(text)
                if now != stage:
                    stage = now
                    bar.set_description(now)
                final = FINAL.search(text)
                if final and final_at is None:
                    final_at = time.monotonic()
                missing = [e for e in [marker, *expect] if e not in text]
                if final and not missing:
                    secs = time.monotonic() - start
                    return Outcome(step, "passed", [console],
                                   f"cloud-init done, marker seen, {accel}, booted in {secs:.0f}s "
                                   f"(guest uptime {float(final.group(1)):.0f}s)", secs)
                if final_at is not None and time.monotonic() - final_at > 15:
                    raise LabError(f"{step}: cloud-init finished but {missing[0]!r} never appeared "
                                   "on the console: the seed was not applied as expected; "
                                   f"console: {console}", _tail(text))
                if grace is not None and not kernel_started(text) and (
                        not thread.is_alive() or time.monotonic() - start > grace):
                    return None
                if not thread.is_alive():
                    proc = result.get("proc")
                    if "error" in result:
                        raise result["error"]
                    code = proc.returncode if proc else "?"
                    err = _tail(proc.stderr.decode("utf-8", "replace"), 3) if proc and proc.stderr else []
                    raise LabError(f"{step}: qemu exited (status {code}) before cloud-init finished; "
                                   f"console: {console}", [*err, *_tail(text)])
                if time.monotonic() - start > timeout:
                    raise LabError(f"{step}: no cloud-init result within {timeout:.0f}s ({accel}); "
                                   f"last console lines follow, full console: {console}",
                                   _tail(text) or ["(the serial console is still empty)"])
    finally:
        _stop(pidfile, thread)


def _stage(text: str) -> str:
    for needle, label in (("running 'modules:final'", "cloud-init final"),
                          ("running 'modules:config'", "cloud-init config"),
                          ("running 'init'", "cloud-init init"),
                          ("running 'init-local'", "cloud-init init-local"),
                          ("Linux version", "kernel booting"),
                          ("GRUB", "bootloader")):
        if needle in text:
            return label
    return "starting qemu"


def _stop(pidfile: Path, thread: threading.Thread) -> None:
    """Stop the QEMU this check started (by its pid file), then wait for it."""
    if not thread.is_alive():
        return
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    thread.join(30)
    if thread.is_alive():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        thread.join(10)

