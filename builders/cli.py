"""labforge's command line: the tasks, as ``labforge`` and as ``invoke``.

Each task is thin: read the lab, call one builders function, print the
result.  The same tasks serve two front ends: the ``labforge`` command
(:func:`main`, installed by ``pip install .``) and ``invoke`` in a checkout
(the top-level ``tasks.py`` exposes the collection :data:`ns`).  Run
``labforge --list`` (or ``invoke --list``) for the verbs and ``--help TASK``
for options.  A problem you can fix is printed as one line on stderr with
exit status 1.

Invoke is imported only when its parser is needed: ``labforge VERB
--option[=VALUE]...`` (long options of one task, what scripts and CI jobs
type) calls the task directly (:func:`_direct_call`), which saves Invoke's
start-up (about a third of `labforge certs`).  Anything else (``--list``,
``--help``, short flags, several tasks, a typo) goes to Invoke's Program,
so every message about the command line is still Invoke's.

Outputs go to the workspace of the lab (:meth:`Workspace.default`):
``LABFORGE_WORKDIR`` when set, else the directory of the ``--lab`` file.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys

from builders.core import lab as labmod
from builders import pipeline
from builders.core.console import setup_logging
from builders.core.errors import LabError
from builders.core.fsutil import os_reason
from builders.core.manifest import Manifest
from builders.core.workspace import Workspace

LAB_HELP = "lab description to read (default: the embedded lab.yaml)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, `kill PID`), unwound exactly like Ctrl-C so
    that every builder's cleanup (temporary files, containers, VMs) runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()


# the command the user typed: advice in messages ("run `invoke certs`") names it
_COMMAND = "invoke"
_ADVICE = re.compile(r"(?<=[`(])invoke (?=[a-z])")


def _as_typed(line: str) -> str:
    return _ADVICE.sub(f"{_COMMAND} ", line) if _COMMAND != "invoke" else line


def _user_errors(fn):
    """Turn a LabError into its line(s) on stderr and exit status 1; Ctrl-C
    into exit status 130 and SIGTERM into 143 (128 + the signal number, as a
    shell reports them), both after the partial outputs were removed."""
    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):  # exits with SystemExit: Invoke's Program lets it through
        setup_logging(verbose=bool(kwargs.get("verbose")))
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(c, *args, **kwargs)
        except LabError as exc:
            for i, line in enumerate(exc.lines()):
                print(("error: " if i == 0 else "  ") + _as_typed(line), file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt as exc:
            how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"error: {how}; partial outputs were removed, rerun to continue",
                  file=sys.stderr)
            raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
        except BrokenPipeError:  # `invoke manifest | head`: the reader is gone, stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except OSError as exc:  # disk full, permission denied, ...: the user can fix it
            if os.environ.get("LABFORGE_DEBUG"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{os_reason(exc)}; fix it and rerun", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception as exc:  # a bug: say so in one line, traceback on request
            if os.environ.get("LABFORGE_DEBUG"):
                raise
            print(f"error: internal error ({type(exc).__name__}: {exc}); this is a labforge "
                  "bug: rerun with LABFORGE_DEBUG=1 and report the traceback", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapper


# every task by its command-line name: (the function with labforge's error
# handling, the keyword arguments of Invoke's @task for it)
_TASKS: dict[str, tuple] = {}


def labtask(**kwargs):
    """A task with labforge's error handling, registered under its dashed name;
    Invoke's @task is applied when :data:`ns` is first used."""
    def deco(fn):
        wrapped = _user_errors(fn)
        _TASKS[kwargs.get("name") or fn.__name__.replace("_", "-")] = (wrapped, kwargs)
        return wrapped
    return deco


def _lab_ws(lab: str | None, needs_hosts: str | None = None) -> tuple[labmod.Lab, Workspace]:
    """The lab and its workspace: LABFORGE_WORKDIR, else beside the lab file.
    ``needs_hosts`` names a task that cannot run on a lab without hosts."""
    lb = labmod.load(lab)
    if needs_hosts:
        lb.require_hosts(needs_hosts)
    return lb, Workspace.default(lb)


def _print(outcomes) -> None:
    for o in outcomes if isinstance(outcomes, (list, tuple)) else [outcomes]:
        print(o.line())


@labtask(help={"lab": LAB_HELP})
def check_lab(c, lab=None):
    """Validate lab.yaml and print a summary of the lab."""
    lb = labmod.load(lab)
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
    "prune": "remove the keys, certificates and stores of identities no longer in the lab "
             "(listed); without it they are kept",
})
def certs(c, lab=None, force=False, rotate=None, prune=False):
    """Issue the lab's certificates, keystores and keys under certs/ (idempotent)."""
    from builders.artifacts.certs import build_certs
    _print(build_certs(*_lab_ws(lab, "certs"), force=force, rotate=rotate or (), prune=prune))


@labtask(help={
    "lab": LAB_HELP,
    "warn_days": "fail when a certificate expires within this many days (default 30)",
})
def certs_check(c, lab=None, warn_days=None):
    """List every certificate with subject, SANs and days to expiry; fail on problems."""
    from builders.artifacts.certs import check_certs, fix_hint
    days = _int(warn_days, "--warn-days", minimum=0)
    lb, ws = _lab_ws(lab)
    rows = check_certs(lb, ws, warn_days=30 if days is None else days)
    for r in rows:
        print(r.line(ws.root))
    bad = [r for r in rows if not r.ok]
    if bad:
        raise LabError(f"certs-check: {len(bad)} of {len(rows)} certificates have problems "
                       f"(first: {bad[0].path.name}: {bad[0].problems[0]}); {fix_hint(bad)}")


# ---- seed ISOs -------------------------------------------------------------

@labtask(iterable=["host"], help={
    "lab": LAB_HELP,
    "host": "build only this host's seed (repeat for more; default: every host)",
    "format": "iso (ISO 9660 'cidata', the default) or vfat",
    "force": "rebuild even when the seed is up to date",
})
def seed_iso(c, lab=None, host=None, format="iso", force=False):
    """Build cloud-init NoCloud seeds (artifacts/seed/<host>.iso) for the lab's hosts."""
    from builders.artifacts.seed import build_seed_isos
    _print(build_seed_isos(*_lab_ws(lab, "seed-iso"), hosts=host or None,
                           force=force, fmt=format))


# ---- base image, overlays, boot checks -------------------------------------
@labtask(help={"lab": LAB_HELP,
               "force": "download or build again even when the image is up to date",
               "verbose": "show debug output (commands run)"})
def base_image(c, lab=None, force=False, verbose=False):
    """Download (verified) or build (diskimage-builder) the base cloud image."""
    from builders.artifacts.baseimage import build_base_image
    _print(build_base_image(*_lab_ws(lab), force=force))


@labtask(iterable=["host"],
         help={"lab": LAB_HELP,
               "host": "only this host (repeatable; default: every host)",
               "force": "recreate overlays even when a VM has written to them (discards its data)",
               "verbose": "show debug output (commands run)"})
def overlays(c, lab=None, host=None, force=False, verbose=False):
    """Create each host's qcow2 overlay backed by the base image."""
    from builders.artifacts.overlays import build_overlays
    _print(build_overlays(*_lab_ws(lab, "overlays"), hosts=host or None, force=force))


@labtask(iterable=["expect"],
         help={"lab": LAB_HELP,
               "host": "the host to boot (required)",
               "timeout": "seconds to wait for cloud-init (default 900)",
               "expect": "also require this text on the console (repeatable)",
               "accel": "kvm or tcg (default: kvm when it can run guests here, else tcg)",
               "memory": "guest memory in MiB, at most the host's (default 1024)",
               "verbose": "show debug output (commands run)"})
def boot_check(c, lab=None, host=None, timeout=None, expect=None, accel=None, memory=None,
               verbose=False):
    """Boot a host's overlay with its seed under QEMU; pass when cloud-init applied the seed."""
    from builders.checks.bootcheck import boot_check as check
    if not host:
        raise LabError("boot-check: give --host NAME")
    timeout_s = _seconds(timeout, "--timeout")
    mem = _int(memory, "--memory", minimum=1)
    _print(check(*_lab_ws(lab, "boot-check"), host,
                 timeout=900.0 if timeout_s is None else timeout_s,
                 expect=expect or (), accel=accel, memory=1024 if mem is None else mem))


@labtask(iterable=["host"],
         help={"lab": LAB_HELP,
               "host": "only this host (repeatable; default: every host)",
               "force": "write the files even when they are up to date",
               "verbose": "show debug output (commands run)"})
def libvirt_xml(c, lab=None, host=None, force=False, verbose=False):
    """Write libvirt domain, volume and network XML per host (for virsh users)."""
    from builders.artifacts.libvirtxml import build_libvirt_xml
    _print(build_libvirt_xml(*_lab_ws(lab, "libvirt-xml"), hosts=host or None, force=force))


@labtask(help={"lab": LAB_HELP,
               "ssh_config": "reach the nodes as this ssh_config says (`vagrant ssh-config > "
                             "FILE`; default: each host's first NIC address with the lab key)",
               "wait": "retry failing checks for up to this many seconds (a lab just up may "
                       "still be electing its leader; default 0)",
               "json": "print one JSON document on stdout (the table goes to stderr)"})
def lab_check(c, lab=None, ssh_config=None, wait=0, json=False):
    """Check a lab that is up: names, the ZooKeeper ensemble over TLS, client certificates."""
    from builders.checks import labcheck
    lb, ws = _lab_ws(lab)
    outcomes = labcheck.lab_check(lb, ws, ssh_config=ssh_config,
                                  wait=_seconds(wait, "--wait", zero=True))
    print(labcheck.table(outcomes), file=sys.stderr if json else sys.stdout)
    if json:
        import json as _json
        print(_json.dumps(labcheck.to_json(lb, ws, outcomes), indent=2))
    failed = [o.step for o in outcomes if o.status != "passed"]
    if failed:
        raise LabError(f"lab-check: {len(failed)} of {len(outcomes)} checks failed "
                       f"({', '.join(failed)}); see the table")


# ---- amphora ---------------------------------------------------------------
@labtask(help={"lab": LAB_HELP, "force": "rebuild the base image even when it is current"})
def builder_base(c, lab=None, force=False):
    """Make the local Debian base image the amphora builder starts FROM (debootstrap + docker import)."""
    from builders.artifacts import amphora
    _print(amphora.build_builder_base(*_lab_ws(lab), force=force))


@labtask(auto_shortflags=False, help={
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
    from builders.artifacts import amphora
    _print(amphora.build_amphora(*_lab_ws(lab), force=force, base_os=base_os,
                                 release=release, arch=arch, size=size, agent=agent,
                                 ssh=False if no_ssh else None, image_type=image_type,
                                 apt_mirror=apt_mirror, pip_index=pip_index, ca_bundle=ca_bundle))

@labtask(help={
    "lab": LAB_HELP,
    "image": "amphora image to boot (default: artifacts/images/amphora-x64-haproxy.qcow2)",
    "timeout": "seconds to wait for the agent to answer (default: 1200, TCG is slow)",
    "accel": "kvm or tcg (default: KVM when it works, else TCG)",
    "quick": "only the agent's API version over mutual TLS (no load balancer, no .venv-octavia)",
})
def amphora_check(c, lab=None, image=None, timeout=None, accel=None, quick=False):
    """Boot the amphora as Nova would and prove it as a load balancer with Octavia's controller code."""
    from builders.checks import amphora_check as ac
    timeout_s = _seconds(timeout, "--timeout")
    _print(ac.check_amphora(*_lab_ws(lab), image=image,
                            timeout=1200.0 if timeout_s is None else timeout_s,
                            accel=accel, quick=quick))


# ---- vagrant ---------------------------------------------------------------

@labtask(help={
    "image": "qcow2 to pack: a path, or a built image's name from the manifest (debian-12, "
             "amphora-x64-haproxy); default: the lab's base image",
    "name": "box name ORG/NAME (default: lab.yaml vagrant.box)",
    "version": "box version MAJOR.MINOR.PATCH (default: the version built from the same "
               "image, else the catalog's latest with the patch number raised, else 1.0.0)",
    "add": "also run `vagrant box add` of this version from the catalog",
    "base_url": "URL the boxes will be served from (catalog URLs become BASE_URL/FILE); "
                "default: file:// URLs of artifacts/boxes/",
    "force": "rebuild even if the box is up to date",
    "lab": LAB_HELP,
})
def vagrant_box(c, image=None, name=None, version=None, add=False, base_url=None, force=False,
                lab=None):
    """Pack a qcow2 as a vagrant-libvirt box and add it to the box catalog."""
    from builders.artifacts import vagrant
    _print(vagrant.build_box(*_lab_ws(lab), image=image, name=name,
                             version=version, add=add, base_url=base_url, force=force))


@labtask(help={"force": "rewrite even if up to date", "lab": LAB_HELP})
def vagrantfile(c, force=False, lab=None):
    """Render the lab's Vagrantfile and libvirt network XML under artifacts/vagrant/."""
    from builders.artifacts import vagrant
    lb, ws = _lab_ws(lab, "vagrantfile")
    _print(vagrant.build_vagrantfile(lb, ws, force=force))
    print("create the lab networks (once per libvirt host), then `vagrant up`:")
    for cmd in vagrant.network_commands(lb, ws):
        print(f"  {cmd}")

# ---- glance ----------------------------------------------------------------

_GLANCE_AUTH_HELP = {
    "cloud": "clouds.yaml cloud to use (default: lab.yaml glance.cloud, OS_CLOUD, or OS_* variables)",
    "os_cacert": "CA bundle to verify Keystone/Glance TLS with (like openstack --os-cacert)",
    "insecure": "do not verify TLS certificates (like openstack --insecure; labs only)",
    "method": "upload flow: auto (direct; the glance-direct import when Glance refuses that), "
              "direct, glance-direct (default: lab.yaml glance.method)",
    "keep": "with --rotate-tag: keep the N newest images of the rotation, delete older ones",
    "deactivate_old": "with --rotate-tag: deactivate older images of the rotation instead of deleting",
    "visibility": "private | shared | community | public (default: lab.yaml glance.visibility)",
    "property": "image property KEY=VALUE (repeatable)",
    "min_ram": "minimum RAM in MiB to boot the image",
    "lab": LAB_HELP,
    "verbose": "log more",
}


@labtask(iterable=["tag", "property"], auto_shortflags=False, help={
    "image": "image file, or an artifact name from the manifest (e.g. debian-12)",
    "name": "image name in Glance (default: the file name without extension)",
    "tag": "tag to add (repeatable)",
    "rotate_tag": "make the new image the only one of this project carrying TAG (e.g. amphora)",
    "disk_format": "Glance disk_format (default: detected with qemu-img)",
    "min_disk": "minimum disk in GB to boot the image",
    **_GLANCE_AUTH_HELP,
})
def glance_upload(c, image, name=None, tag=None, property=None, visibility=None, cloud=None,
                  rotate_tag=None, keep=None, deactivate_old=False, method=None,
                  disk_format=None, min_disk=None, min_ram=None, os_cacert=None,
                  insecure=False, lab=None, verbose=False):
    """Upload an image to Glance: streamed, sha512-verified, idempotent, optional tag rotation."""
    from builders.publishers import glance
    _print(glance.upload_image(
        *_lab_ws(lab), image=image, name=name, tags=tag or [],
        properties=property or [], visibility=visibility, cloud=cloud, rotate_tag=rotate_tag,
        keep=_int(keep, "--keep"), deactivate_old=deactivate_old, method=method,
        disk_format=disk_format, min_disk=_int(min_disk, "--min-disk"),
        min_ram=_int(min_ram, "--min-ram"), cacert=os_cacert, insecure=insecure))


@labtask(iterable=["property"], auto_shortflags=False, help={
    **_GLANCE_AUTH_HELP,
    "keep": "keep the N newest amphora images (the tag moves to the new one), delete older ones "
            "(default: lab.yaml glance.keep; none deleted)",
    "deactivate_old": "deactivate older amphora images instead of deleting them "
                      "(default: lab.yaml glance.deactivate_old)",
    "min_ram": "minimum RAM in MiB (default 1024, Octavia's amphora flavor)",
})
def publish_amphora(c, cloud=None, property=None, keep=None, deactivate_old=False,
                    method=None, visibility=None, min_ram=None, os_cacert=None,
                    insecure=False, lab=None, verbose=False):
    """Publish the amphora image to Glance as Octavia expects it (name, tag rotation, properties)."""
    from builders.publishers import glance
    _print(glance.publish_amphora(
        *_lab_ws(lab), cloud=cloud, properties=property or [],
        keep=_int(keep, "--keep"), deactivate_old=deactivate_old or None, method=method,
        visibility=visibility, min_ram=_int(min_ram, "--min-ram") or 1024,
        cacert=os_cacert, insecure=insecure))


def _int(value, option: str, minimum: int | None = None):
    """An option's whole number (None when not given); anything else is one line."""
    if value is None:
        return None
    try:
        n = int(str(value).strip(), 10)
    except (TypeError, ValueError):
        raise LabError(f"{option} {value}: expected a whole number") from None
    if minimum is not None and n < minimum:
        raise LabError(f"{option} {value}: must be at least {minimum}")
    return n


def _seconds(value, option: str, zero: bool = False):
    """An option's positive (or, with zero, non-negative) number of seconds;
    None when not given."""
    if value is None:
        return None
    try:
        n = float(str(value).strip())
    except (TypeError, ValueError):
        raise LabError(f"{option} {value}: expected a number of seconds") from None
    if not (0 <= n if zero else 0 < n) or n == float("inf"):
        raise LabError(f"{option} {value}: expected a {'non-negative' if zero else 'positive'} "
                       "number of seconds")
    return n

# ---- whole lab, manifest ----------------------------------------------------

@labtask(name="all", iterable=["only", "skip"], help={
    "lab": LAB_HELP,
    "only": "run only this step (repeatable): " + ", ".join(pipeline.KINDS),
    "skip": "skip this step (repeatable)",
    "force": "rebuild even when inputs are unchanged (never replaces a CA: see certs --rotate)",
    "json": "print one JSON document on stdout (human output goes to stderr)",
})
def build_all(c, lab=None, only=None, skip=None, force=False, json=False):
    """Build everything the lab needs: certs, seeds, base image, overlays, amphora, boxes, Glance."""
    lb, ws = _lab_ws(lab)
    pipeline.check_kinds(tuple(only or ()), "--only")
    pipeline.check_kinds(tuple(skip or ()), "--skip")
    host_steps = {"certs", "seed-iso", "overlays", "vagrant"}
    if any(k in host_steps for k in (only or pipeline.KINDS) if k not in (skip or ())):
        lb.require_hosts("invoke all (certs, seed-iso, overlays, vagrant)")

    def show(rep):
        detail = f" ({rep.detail})" if rep.detail else ""
        print(f"{rep.name}: {rep.status}{detail} [{rep.seconds:.1f}s]", file=sys.stderr)

    reports = pipeline.run_all(lb, ws, only=tuple(only or ()), skip=tuple(skip or ()),
                               force=force, on_step=show)
    print(pipeline.summary_table(reports), file=sys.stderr)
    if json:
        import json as _json
        print(_json.dumps(pipeline.to_json(lb, ws, reports), indent=2))
    failed = [r.name for r in reports if r.status == "failed"]
    if failed:
        raise LabError(f"{', '.join(failed)} failed; see the lines above")


@labtask(help={"lab": LAB_HELP})
def manifest(c, lab=None):
    """Print artifacts/manifest.json: every artifact with kind, sha256, size, inputs."""
    import json as _json
    print(_json.dumps(Manifest(Workspace.default(lab).artifacts).load(), indent=2, sort_keys=True))


@labtask(help={"lab": LAB_HELP})
def verify(c, lab=None):
    """Re-hash every artifact in the manifest and report drift (exit 1 when any)."""
    m = Manifest(Workspace.default(lab).artifacts)
    n = len(m.entries())
    problems = m.verify()
    for rel, problem in problems:
        print(f"{rel}: {problem}", file=sys.stderr)
    if problems:
        raise LabError(f"{m.path}: {len(problems)} of {n} artifacts drifted; rebuild them "
                       "(invoke all) or restore them")
    print(f"{m.path}: all {n} artifacts verify")


# ---- the command -------------------------------------------------------------

def _collection():
    """Invoke's collection of the tasks, made once, on first use."""
    global ns
    if "ns" not in globals():
        from invoke import Collection, task
        ns = Collection("labforge")
        ns.__doc__ = __doc__
        for fn, kwargs in _TASKS.values():
            ns.add_task(task(**kwargs)(fn))
    return ns


def __getattr__(name: str):
    """``ns`` (tasks.py's ``from builders.cli import ns``) is :func:`_collection` (PEP 562)."""
    if name == "ns":
        return _collection()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _direct_call(args: list[str]):
    """The task and keyword arguments of ``VERB --option[=VALUE]...`` when
    that is all ``args`` holds, read as Invoke reads it; None for anything
    else (Invoke's parser then takes the command line as it is)."""
    if not args or args[0] not in _TASKS:
        return None
    fn, spec = _TASKS[args[0]]
    code = fn.__wrapped__.__code__
    names = code.co_varnames[1:code.co_argcount]       # after the context
    defaults = fn.__wrapped__.__defaults__ or ()
    if len(defaults) != len(names):                    # a positional argument
        return None
    default = dict(zip(names, defaults))
    iterable = set(spec.get("iterable", ()))
    values: dict = {}
    rest = iter(args[1:])
    for token in rest:
        option, eq, value = token.partition("=")
        name = option[2:].replace("-", "_")
        if not option.startswith("--") or "_" in option or name not in default:
            return None
        if isinstance(default[name], bool):            # a flag (all default to off)
            if eq or default[name] or name in values:
                return None
            values[name] = True
            continue
        if not eq:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None
        if isinstance(default[name], int):             # Invoke casts to the default's type
            try:
                value = int(value)
            except ValueError:
                return None
        if name in iterable:
            values.setdefault(name, []).append(value)
        elif name in values:
            return None
        else:
            values[name] = value
    return fn, values


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("labforge")
    except PackageNotFoundError:      # a checkout that was never pip-installed
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    """The ``labforge`` console script: a plain task call directly, anything
    else through Invoke's Program over :data:`ns`."""
    global _COMMAND
    _COMMAND = "labforge"
    argv = sys.argv if argv is None else argv
    direct = _direct_call(argv[1:])
    if direct:
        fn, kwargs = direct
        fn(None, **kwargs)
        return
    from invoke import Program
    program = Program(namespace=_collection(), name="labforge", binary="labforge",
                      version=_version())
    try:
        program.run(argv)
    except BrokenPipeError:           # `labforge --list | head`: the reader is gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
