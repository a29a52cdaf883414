"""labforge: build everything a virtual lab needs from one lab.yaml.

Each task is thin: read the lab, call one builders function, print the
result.  Run `invoke --list` for the verbs and `invoke --help TASK` for
options.  A problem you can fix is printed as one line on stderr with exit
status 1.
"""

from __future__ import annotations

import functools
import sys

from invoke import Exit, task

from builders import lab as labmod
from builders.console import setup_logging
from builders.errors import LabError
from builders.workspace import Workspace

LAB_HELP = "lab description to read (default: the embedded lab.yaml)"


def _user_errors(fn):
    """Turn a LabError into its line(s) on stderr and exit status 1; Ctrl-C into 130."""
    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        setup_logging(verbose=bool(kwargs.get("verbose")))
        try:
            return fn(c, *args, **kwargs)
        except LabError as exc:
            for i, line in enumerate(exc.lines()):
                print(("error: " if i == 0 else "  ") + line, file=sys.stderr)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            print("error: interrupted; partial outputs were removed, rerun to continue",
                  file=sys.stderr)
            raise Exit(code=130) from None
    return wrapper


def labtask(*args, **kwargs):
    """@task with labforge's error handling."""
    def deco(fn):
        return task(*args, **kwargs)(_user_errors(fn))
    return deco


def _load(lab: str | None) -> labmod.Lab:
    return labmod.load(lab)


def _print(outcomes) -> None:
    for o in outcomes if isinstance(outcomes, (list, tuple)) else [outcomes]:
        print(o.line())


@labtask(help={"lab": LAB_HELP})
def check_lab(c, lab=None):
    """Validate lab.yaml and print a summary of the lab."""
    lb = _load(lab)
    print(f"{lb.source}: ok: lab {lb.name}, {len(lb.hosts)} hosts, "
          f"{len(lb.networks)} networks")
    for h in lb.hosts:
        print(f"  {h.name:<12} {str(h.ip):<15} cpus={h.cpus} memory={h.memory}MiB "
              f"disk={h.disk}GiB roles={','.join(h.roles) or '-'}")


# ---- certs ---------------------------------------------------------------
@labtask(iterable=["rotate"], help={
    "lab": LAB_HELP,
    "force": "re-issue every leaf key, certificate and store under the existing CAs",
    "rotate": "replace a set's CA (or key) and everything it signed: kafka, octavia or ssh "
              "(repeatable)",
})
def certs(c, lab=None, force=False, rotate=None):
    """Issue the lab's certificates, keystores and keys under certs/ (idempotent)."""
    from builders.certs import build_certs
    _print(build_certs(_load(lab), Workspace.default(), force=force, rotate=rotate or ()))


@labtask(help={
    "lab": LAB_HELP,
    "warn_days": "fail when a certificate expires within this many days (default 30)",
})
def certs_check(c, lab=None, warn_days=30):
    """List every certificate with subject, SANs and days to expiry; fail on problems."""
    from builders.certs import check_certs
    ws = Workspace.default()
    rows = check_certs(_load(lab), ws, warn_days=int(warn_days))
    for r in rows:
        print(r.line(ws.root))
    bad = [r for r in rows if not r.ok]
    if bad:
        raise LabError(f"certs-check: {len(bad)} of {len(rows)} certificates have problems "
                       f"(first: {bad[0].path.name}: {bad[0].problems[0]}); run "
                       "`invoke certs` (or `--rotate SET` for a CA)")


# ---- seed ISOs -------------------------------------------------------------

@labtask(iterable=["host"], help={
    "lab": LAB_HELP,
    "host": "build only this host's seed (repeat for more; default: every host)",
    "format": "iso (ISO 9660 'cidata', the default) or vfat",
    "force": "rebuild even when the seed is up to date",
})
def seed_iso(c, lab=None, host=None, format="iso", force=False):
    """Build cloud-init NoCloud seeds (artifacts/seed/<host>.iso) for the lab's hosts."""
    from builders.seediso import build_seed_isos
    _print(build_seed_isos(_load(lab), Workspace.default(), hosts=host or None,
                           force=force, fmt=format))


# ---- base image, overlays, boot checks -------------------------------------
@labtask(help={"lab": LAB_HELP,
               "force": "download or build again even when the image is up to date",
               "verbose": "show debug output (commands run)"})
def base_image(c, lab=None, force=False, verbose=False):
    """Download (verified) or build (diskimage-builder) the base cloud image."""
    from builders.baseimage import build_base_image
    _print(build_base_image(_load(lab), Workspace.default(), force=force))


@labtask(iterable=["host"],
         help={"lab": LAB_HELP,
               "host": "only this host (repeatable; default: every host)",
               "force": "recreate overlays even when a VM has written to them (discards its data)",
               "verbose": "show debug output (commands run)"})
def overlays(c, lab=None, host=None, force=False, verbose=False):
    """Create each host's qcow2 overlay backed by the base image."""
    from builders.overlays import build_overlays
    _print(build_overlays(_load(lab), Workspace.default(), hosts=host or None, force=force))


@labtask(iterable=["expect"],
         help={"lab": LAB_HELP,
               "host": "the host to boot (required)",
               "timeout": "seconds to wait for cloud-init (default 900)",
               "expect": "also require this text on the console (repeatable)",
               "accel": "kvm or tcg (default: kvm when it can run guests here, else tcg)",
               "memory": "guest memory in MiB, at most the host's (default 1024)",
               "verbose": "show debug output (commands run)"})
def boot_check(c, lab=None, host=None, timeout=900, expect=None, accel=None, memory=1024,
               verbose=False):
    """Boot a host's overlay with its seed under QEMU; pass when cloud-init applied the seed."""
    from builders.bootcheck import boot_check as check
    if not host:
        raise LabError("boot-check: give --host NAME")
    _print(check(_load(lab), Workspace.default(), host, timeout=float(timeout),
                 expect=expect or (), accel=accel, memory=int(memory)))


@labtask(iterable=["host"],
         help={"lab": LAB_HELP,
               "host": "only this host (repeatable; default: every host)",
               "force": "write the files even when they are up to date",
               "verbose": "show debug output (commands run)"})
def libvirt_xml(c, lab=None, host=None, force=False, verbose=False):
    """Write libvirt domain, volume and network XML per host (for virsh users)."""
    from builders.libvirtxml import build_libvirt_xml
    _print(build_libvirt_xml(_load(lab), Workspace.default(), hosts=host or None, force=force))


# ---- amphora ---------------------------------------------------------------
@labtask(help={"lab": LAB_HELP, "force": "rebuild the base image even when it is current"})
def builder_base(c, lab=None, force=False):
    """Make the local Debian base image the amphora builder starts FROM (debootstrap + docker import)."""
    from builders import amphora
    _print(amphora.build_builder_base(_load(lab), Workspace.default(), force=force))


@labtask(help={
    "lab": LAB_HELP,
    "force": "rebuild even when the image is up to date (the build cache is reused)",
    "base_os": "debian (bookworm, buildable here) or ubuntu (noble, needs an Ubuntu mirror); "
               "default: octavia.amphora.base_os",
    "release": "distribution release code name (default: octavia.amphora.release)",
    "arch": "amd64 or arm64 (default: octavia.amphora.arch)",
    "size": "root disk size in GB, at least 2 (default: octavia.amphora.size)",
    "agent": "source (from the Octavia sdist) or package (distro package); default: octavia.amphora.agent",
    "no_ssh": "leave sshd out of the image (upstream's remove-sshd element)",
    "image_type": "qcow2 or raw (default: octavia.amphora.image_type)",
    "apt_mirror": "distribution mirror URL (default: build.debian_mirror / ubuntu_mirror, "
                  "else the machine's apt sources)",
    "pip_index": "PyPI index URL for the builder and the image (default: build.pip_index, else PyPI)",
    "ca_bundle": "CA bundle (PEM) of an HTTPS proxy, used during the build only "
                 "(default: build.ca_bundle, the host's bundle)",
})
def build_amphora(c, lab=None, force=False, base_os=None, release=None, arch=None, size=None,
                  agent=None, no_ssh=False, image_type=None, apt_mirror=None, pip_index=None,
                  ca_bundle=None):
    """Build the Octavia amphora image with diskimage-builder in a container."""
    from builders import amphora
    _print(amphora.build_amphora(_load(lab), Workspace.default(), force=force, base_os=base_os,
                                 release=release, arch=arch, size=size, agent=agent,
                                 ssh=False if no_ssh else None, image_type=image_type,
                                 apt_mirror=apt_mirror, pip_index=pip_index, ca_bundle=ca_bundle))

@labtask(help={
    "lab": LAB_HELP,
    "image": "amphora image to boot (default: artifacts/images/amphora-x64-haproxy.qcow2)",
    "timeout": "seconds to wait for the agent to answer (default: 1200, TCG is slow)",
    "accel": "kvm or tcg (default: KVM when it works, else TCG)",
})
def amphora_check(c, lab=None, image=None, timeout=1200, accel=None):
    """Boot the amphora under QEMU with a Nova-style config drive and prove its agent (mutual TLS)."""
    from builders import amphora_check as ac
    _print(ac.check_amphora(_load(lab), Workspace.default(), image=image, timeout=float(timeout),
                            accel=accel))


# ---- vagrant ---------------------------------------------------------------

# ---- glance ----------------------------------------------------------------

# ---- whole lab, manifest ----------------------------------------------------
