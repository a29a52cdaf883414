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

# ---- seed ISOs -------------------------------------------------------------

# ---- base image, overlays, boot checks -------------------------------------

# ---- amphora ---------------------------------------------------------------

# ---- vagrant ---------------------------------------------------------------

# ---- glance ----------------------------------------------------------------

_GLANCE_AUTH_HELP = {
    "cloud": "clouds.yaml cloud to use (default: lab.yaml glance.cloud, OS_CLOUD, or OS_* variables)",
    "os_cacert": "CA bundle to verify Keystone/Glance TLS with (like openstack --os-cacert)",
    "insecure": "do not verify TLS certificates (like openstack --insecure; labs only)",
    "method": "upload flow: auto (glance-direct import when Glance offers it), direct, "
              "glance-direct (default: lab.yaml glance.method)",
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
    from builders import glance
    _print(glance.upload_image(
        _load(lab), Workspace.default(), image=image, name=name, tags=tag or [],
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
    from builders import glance
    _print(glance.publish_amphora(
        _load(lab), Workspace.default(), cloud=cloud, properties=property or [],
        keep=_int(keep, "--keep"), deactivate_old=deactivate_old or None, method=method,
        visibility=visibility, min_ram=_int(min_ram, "--min-ram") or 1024,
        cacert=os_cacert, insecure=insecure))


def _int(value, option: str):
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LabError(f"{option} {value}: expected a whole number") from None

# ---- whole lab, manifest ----------------------------------------------------
