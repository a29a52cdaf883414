"""Boot a host's disk under QEMU and prove that cloud-init applied its seed.

``boot_check`` boots a throwaway overlay on top of the host's overlay
(``artifacts/vms/<host>.qcow2`` is only read, never written) with the
host's seed ISO as a CD-ROM, watches the serial console and passes when

* cloud-init reports its final stage done (``Cloud-init v. ... finished at``),
* the seed's marker line (:func:`builders.artifacts.seed.seed_marker`, printed by
  the seed's last runcmd) appeared, and
* every ``expect`` text appeared (for checks a lab adds to runcmd, e.g. the
  hostname or a written file printed to the console).

It times out with the last console lines.  The VM runs under
:mod:`builders.tools.qemu_vm` (KVM when it can run a guest here, otherwise
TCG; ``LABFORGE_ACCEL=kvm|tcg`` overrides the detection).  The console of
the last boot is kept in ``artifacts/logs/boot-<host>.console.log``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

from builders.artifacts.overlays import overlay_path
from builders.core.contract import Check
from builders.core.errors import LabError
from builders.core.lab import Host, Lab
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.artifacts import seed
from builders.tools import qemu_vm
from builders.tools.qemu_vm import Drive, Nic, VmSpec

FINAL = re.compile(r"Cloud-init v\. \S+ finished at .*?Up ([\d.]+) seconds")


def _seed(lab: Lab, ws: Workspace, host: Host) -> tuple[Path, str]:
    path = seed.seed_path(lab, ws, host)
    if not path.is_file():
        raise LabError(f"{path}: no seed for {host.name}; run `invoke seed-iso` first")
    return path, seed.seed_marker(lab, host, ws)


class BootCheck(Check):
    """``invoke boot-check --host NAME``: boot a host, prove cloud-init applied its seed."""

    name = "boot-check"
    help = "boot a host's overlay with its seed under QEMU; pass when cloud-init applied it"

    def check(self, lab: Lab, ws: Workspace, *, host: str, timeout: float = 900,
              expect: Sequence[str] = (), accel: str | None = None,
              memory: int = 1024) -> list[Outcome]:
        return _boot_check(lab, ws, host, timeout=timeout, expect=expect, accel=accel,
                           memory=memory)


BOOT_CHECK = BootCheck()


def boot_check(lab: Lab, ws: Workspace, host: str, *, timeout: float = 900,
               expect: Sequence[str] = (), accel: str | None = None,
               memory: int = 1024) -> list[Outcome]:
    """Boot ``host`` from a throwaway overlay and wait for cloud-init and the marker."""
    return BOOT_CHECK.check(lab, ws, host=host, timeout=timeout, expect=expect, accel=accel,
                            memory=memory)


def _boot_check(lab: Lab, ws: Workspace, host: str, *, timeout: float, expect: Sequence[str],
                accel: str | None, memory: int) -> list[Outcome]:
    h = lab.host(host)
    overlay = overlay_path(ws, h)
    if not overlay.is_file():
        raise LabError(f"{overlay}: no overlay for {h.name}; run `invoke overlays` first")
    seed, marker = _seed(lab, ws, h)
    qemu_vm.require_tools()
    step = f"boot-check {h.name}"
    spec = VmSpec(name=f"labforge-boot-{h.name}",
                  drives=(Drive(overlay, throwaway=True), Drive(seed, "raw", cdrom=True)),
                  # one user-mode NIC per lab NIC, with its MAC: the seed's
                  # network-config matches NICs by MAC
                  nics=tuple(Nic.user(mac=n.mac) for n in h.nics) if len(h.nics) > 1
                  else (Nic.user(mac=h.mac),),
                  memory=min(memory, h.memory), cpus=min(h.cpus, os.cpu_count() or 1, 2))
    wanted = [marker, *expect]
    final_at: list[float] = []

    def probe(vm: qemu_vm.Vm):
        text = vm.text()
        final = FINAL.search(text)
        if final and not final_at:
            final_at.append(time.monotonic())
        missing = [e for e in wanted if e not in text]
        if final and not missing:
            return float(final.group(1))
        if final_at and time.monotonic() - final_at[0] > 15:
            raise LabError(f"{step}: cloud-init finished but {missing[0]!r} never appeared "
                           "on the console: the seed was not applied as expected; "
                           f"console: {vm.console}", qemu_vm.tail(text))
        return None

    def too_late(vm: qemu_vm.Vm, limit: float) -> LabError:
        return LabError(f"{step}: no cloud-init result within {limit:.0f}s ({vm.accel}); "
                        f"last console lines follow, full console: {vm.console}",
                        qemu_vm.tail(vm.text()) or ["(the serial console is still empty)"])

    watch = qemu_vm.Watch(probe, waiting_for="cloud-init finished", stage=_stage,
                          timeout_error=too_late)
    console = ws.artifact_dir("logs") / f"boot-{h.name}.console.log"
    booted = qemu_vm.boot(spec, watch, what=step, console=console, timeout=timeout,
                          accel=accel, ws=ws, workdir=ws.cache_dir("boot-check"))
    return [Outcome(step, "passed", [console],
                    f"cloud-init done, marker seen, {booted.accel}, booted in {booted.seconds:.0f}s "
                    f"(guest uptime {booted.result:.0f}s)", booted.seconds)]


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
