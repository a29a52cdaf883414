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
    from builders import vagrant
    _print(vagrant.build_box(_load(lab), Workspace.default(), image=image, name=name,
                             version=version, add=add, base_url=base_url, force=force))


@labtask(help={"force": "rewrite even if up to date", "lab": LAB_HELP})
def vagrantfile(c, force=False, lab=None):
    """Render the lab's Vagrantfile and libvirt network XML under artifacts/vagrant/."""
    from builders import vagrant
    lb, ws = _load(lab), Workspace.default()
    _print(vagrant.build_vagrantfile(lb, ws, force=force))
    print("create the lab networks (once per libvirt host), then `vagrant up`:")
    for cmd in vagrant.network_commands(lb, ws):
        print(f"  {cmd}")

# ---- glance ----------------------------------------------------------------

# ---- whole lab, manifest ----------------------------------------------------
