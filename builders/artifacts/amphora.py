"""The Octavia amphora image, built with diskimage-builder in the builder image.

The builder :data:`AMPHORA` (:mod:`builders.core.contract`) declares the
image and produces it; ``build_amphora`` runs it.  It makes (or reuses) the
builder image
(:mod:`builders.tools.docker_engine`: diskimage-builder pinned, Octavia's
elements and agent source from the Octavia sdist on PyPI, labforge's local
elements), then runs ``disk-image-create`` in it through
:func:`builders.tools.dib.disk_image_create`, the same path the base image
takes, with upstream's element list for the amphora plus labforge's local
elements that fill the Debian gaps.  This module holds only what makes an
amphora an amphora: its settings, its element list and its DIB settings.
The DIB image cache (``cache/amphora/dib``: the debootstrap tarball, pip
cache and source repositories) persists between builds.  The image is
written under a temporary name and renamed into
``artifacts/images/amphora-x64-haproxy.qcow2``.

Why disk-image-create directly rather than upstream's diskimage-create.sh:
the script refuses a Debian base (``-i`` accepts ubuntu/fedora/centos/rhel/
rocky only), hard-wires the element list and environment, and offers no
hook for a persistent debootstrap tarball; calling disk-image-create with
the same element list keeps upstream's elements while making Debian
buildable and the build cacheable.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from builders.core.console import progress
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools import dib, distros, docker_engine, qemu_img
from builders.tools.buildenv import ca_bundle as _lab_ca_bundle

log = logging.getLogger("labforge")

IMAGE_NAME = "amphora-x64-haproxy"
MIN_SIZE_GB = 2                    # a Debian amphora uses ~1.4 GB of its root fs
ARCHES = tuple(distros.ARCHES)

# upstream's diskimage-create.sh element sequence for the haproxy amphora
# (base vm <os> haproxy-octavia rebind-sshd no-resolvconf amphora-agent
# octavia-lib sos cloud-init-datasources remove-default-ints
# keepalived-octavia ipvsadmin pip-cache certs-ramfs), plus labforge's.
UPSTREAM_ELEMENTS = ("base", "vm", "haproxy-octavia", "rebind-sshd", "no-resolvconf",
                     "amphora-agent", "octavia-lib", "sos", "cloud-init-datasources",
                     "remove-default-ints", "keepalived-octavia", "ipvsadmin", "pip-cache",
                     "certs-ramfs")
LOCAL_ELEMENTS = ("labforge-build-ca",)
DEBIAN_ELEMENTS = ("labforge-debian",)

# The amphora's package layer (dib.package_layer): the packages Octavia
# 19.0.0's elements install on Debian with the agent from source (taken from
# a build's install-packages runs; the build deps the agent element removes
# at the end are removed from the layered build too).  The layer is used
# only for that combination; any other version, --agent package or Ubuntu
# builds without it, exactly as before.
LAYER_OCTAVIA_VERSION = "19.0.0"
LAYER_PACKAGES = (
    *dib.DEBIAN_MINIMAL_LAYER,
    "locales", "adduser", "ca-certificates", "python3-yaml",
    # vim-tiny before pollinate: its vim-common then satisfies pollinate's
    # "xxd | vim-common" as in DIB's own install, instead of adding xxd
    "vim-tiny",
    "acl", "acpid", "apparmor", "at", "bash-completion", "build-essential", "cloud-guest-utils",
    "cloud-init", "cron", "cryptsetup", "curl", "dbus", "dkms", "dmeventd", "ethtool", "gawk",
    "git", "haproxy", "ifenslave", "ifupdown", "iptables", "iputils-ping", "iputils-tracepath",
    "ipvsadm", "irqbalance", "isc-dhcp-client", "keepalived", "less", "libffi-dev", "libssl-dev",
    "logrotate", "lsof", "net-tools", "netcat-openbsd", "nftables", "open-vm-tools",
    "openssh-client", "openssh-server", "pollinate", "psmisc", "python3-dev", "python3-pip",
    "python3-venv", "rsync", "rsyslog", "socat", "tcpdump", "tmux", "uuid-runtime", "vlan",
)


# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------
def settings(lab: Lab, **over) -> dict:
    """The effective amphora settings: lab.yaml octavia.amphora, then options."""
    a = lab.octavia.amphora
    s = {
        "base_os": a.base_os, "release": a.release, "arch": a.arch, "size": a.size,
        "agent": a.agent, "ssh": a.ssh, "image_type": a.image_type,
        "octavia_version": a.octavia_version, "octavia_git": a.octavia_git,
        "octavia_ref": a.octavia_ref,
    }
    for k, v in over.items():
        if v is not None:
            s[k] = v
    if s["base_os"] not in distros.DISTROS:
        raise LabError(f"--base-os {s['base_os']}: unknown base OS; use one of "
                       f"{', '.join(distros.DISTROS)}")
    if over.get("base_os") and not over.get("release") and s["base_os"] != a.base_os:
        s["release"] = distros.get(s["base_os"]).amphora_release
    if s["arch"] not in ARCHES:
        raise LabError(f"--arch {s['arch']}: unknown architecture; use one of {', '.join(ARCHES)}")
    if s["image_type"] not in ("qcow2", "raw"):
        raise LabError(f"--image-type {s['image_type']}: use qcow2 or raw")
    if s["agent"] not in ("source", "package"):
        raise LabError(f"--agent {s['agent']}: use source (Octavia sdist) or package")
    try:
        s["size"] = int(s["size"])
    except (TypeError, ValueError):
        raise LabError(f"--size {s['size']}: give the disk size in GB (a whole number)") from None
    if s["size"] < MIN_SIZE_GB:
        raise LabError(f"--size {s['size']}: the amphora needs at least {MIN_SIZE_GB} GB "
                       "(octavia.amphora.size in lab.yaml); give --size 2 or more")
    if s["size"] > 100:
        raise LabError(f"--size {s['size']}: more than 100 GB is surely a mistake; give 2-100")
    if not re.match(r"^[a-z][a-z0-9.-]*$", str(s["release"])):
        raise LabError(f"--release {s['release']!r}: not a release code name (e.g. bookworm, noble)")
    if not s["octavia_git"] and not re.match(r"^\d+(\.\d+)*([a-z]+\d*)?$", str(s["octavia_version"])):
        raise LabError(f"octavia.amphora.octavia_version {s['octavia_version']!r}: not a "
                       "release number (e.g. 19.0.0)")
    return s


def with_build_settings(lab: Lab, *, apt_mirror: str | None = None, pip_index: str | None = None,
                        ca_bundle: str | None = None, base_os: str | None = None) -> Lab:
    """The lab with command-line mirror / pip index / CA bundle overrides applied."""
    import dataclasses
    changes = {}
    if apt_mirror:
        if not re.match(r"^(https?|file)://", apt_mirror):
            raise LabError(f"--apt-mirror {apt_mirror}: give a URL (http://deb.debian.org/debian)")
        key = "ubuntu_mirror" if (base_os or lab.octavia.amphora.base_os) == "ubuntu" else "debian_mirror"
        changes[key] = apt_mirror.rstrip("/")
    if pip_index:
        if not re.match(r"^(https?|file)://", pip_index):
            raise LabError(f"--pip-index {pip_index}: give a URL (https://pypi.org/simple)")
        changes["pip_index"] = pip_index.rstrip("/")
    if ca_bundle:
        p = Path(ca_bundle).expanduser().resolve()
        if not p.is_file():
            raise LabError(f"--ca-bundle {ca_bundle}: no such file; give the PEM bundle of your "
                           "HTTPS proxy's CA")
        changes["ca_bundle"] = str(p)
    if not changes:
        return lab
    return dataclasses.replace(lab, build=dataclasses.replace(lab.build, **changes))


def artifact_path(ws: Workspace, s: dict) -> Path:
    ext = "qcow2" if s["image_type"] == "qcow2" else "raw"
    return ws.artifacts / "images" / f"{IMAGE_NAME}.{ext}"


# --------------------------------------------------------------------------
# the amphora's elements and DIB settings
# --------------------------------------------------------------------------
def elements(s: dict) -> list[str]:
    os_element = distros.get(s["base_os"]).dib_element
    out = list(UPSTREAM_ELEMENTS[:2]) + [os_element] + list(UPSTREAM_ELEMENTS[2:])
    if s["base_os"] == "ubuntu":
        out.append("amphora-apparmor")
    if not s["ssh"]:
        out.append("remove-sshd")
    out += LOCAL_ELEMENTS
    if s["base_os"] == "debian":
        out += DEBIAN_ELEMENTS
    return out


def dib_settings(lab: Lab, s: dict, cache: Path | None = None) -> dict[str, str]:
    """The amphora's own DIB settings (the ``env`` of
    :func:`builders.tools.dib.disk_image_create`, which adds mirrors, pip
    index and caches).  ``cache``: the DIB image cache directory (None for
    the input digest, which must not depend on where the workspace is)."""
    src = docker_engine.BUILDER_SRC
    env = {
        "DIB_RELEASE": s["release"],
        "DIB_CLOUD_INIT_DATASOURCES": "ConfigDrive",
        "DIB_GRUB_TIMEOUT": "0",
        "DIB_OCTAVIA_AMP_USE_NFTABLES": "True",
        "DIB_OCTAVIA_AMP_USE_SSH": "True" if s["ssh"] else "False",
        "DIB_REPOLOCATION_amphora_agent": f"{src}/octavia",
        "DIB_REPOREF_amphora_agent": "labforge",
        "DIB_REPOLOCATION_octavia_lib": f"{src}/octavia-lib",
        "DIB_REPOREF_octavia_lib": "labforge",
        "DIB_REPOLOCATION_upper_constraints": "file:///opt/labforge/upper-constraints.txt",
        "LABFORGE_KEEP_CA_BUNDLE": "1" if lab.build.keep_ca_bundle else "0",
    }
    layer = layer_name(lab, s)
    if cache is not None:
        env["DIB_IMAGE_CACHE"] = str(cache / "layers" / layer if layer else cache)
    if layer:
        main, sec = distros.debian_mirrors(lab)
        env["DIB_MMDEBSTRAP_EXTRA_ARGS"] = dib.package_layer(s["release"], main, sec, LAYER_PACKAGES)[1]
    if s["base_os"] == "ubuntu":
        env["DIB_UBUNTU_KERNEL"] = "linux-image-virtual"
    if _lab_ca_bundle(lab):
        env["LABFORGE_BUILD_CA"] = docker_engine.BUILDER_CA   # the image's copy (labforge-build-ca)
    if s["agent"] == "package":
        env["DIB_INSTALLTYPE_amphora_agent"] = "package"
        if s["base_os"] == "debian":
            env["LABFORGE_RENAME_PACKAGES"] = "amphora-agent=octavia-agent"
    return env


def dib_environment(lab: Lab, ws: Workspace, s: dict) -> dict[str, str]:
    """The whole environment disk-image-create runs with in the builder image."""
    return dib.dib_env(lab, ws, elements(s), dib_settings(lab, s, _cache(ws)),
                       distro=s["base_os"], host_ca=False, tmpfs=True)


def _cache(ws: Workspace) -> Path:
    return ws.cache_dir("amphora", "dib")


def layer_name(lab: Lab, s: dict) -> str | None:
    """The package layer's directory under cache/amphora/dib/layers, or None
    when this build does not use one (see LAYER_PACKAGES)."""
    if s["base_os"] != "debian" or s["arch"] != "amd64" or s["agent"] != "source" \
            or s["octavia_git"] or s["octavia_version"] != LAYER_OCTAVIA_VERSION:
        return None
    main, sec = distros.debian_mirrors(lab)
    return dib.package_layer(s["release"], main, sec, LAYER_PACKAGES)[0]


def _mirrors(lab: Lab, s: dict) -> tuple:
    if s["base_os"] == "debian":
        return distros.debian_mirrors(lab)
    return (distros.ubuntu_mirror(lab),)


def _inputs(lab: Lab, s: dict) -> tuple:
    """Every input of the amphora: settings, builder image inputs, elements,
    mirrors, its DIB settings; where the workspace is is not one."""
    return (2, s, docker_engine.builder_inputs(lab, s), elements(s), _mirrors(lab, s),
            dib_settings(lab, s))


def image_digest(lab: Lab, s: dict) -> str:
    """The input digest of the amphora with settings ``s`` (see :func:`_inputs`)."""
    return input_digest(KIND, *_inputs(lab, s))


# --------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------
KIND = "amphora"


class Amphora(Builder):
    """``artifacts/images/amphora-x64-haproxy.qcow2`` (see module doc).

    Options (those of ``invoke build-amphora``): base_os, release, arch,
    size, agent, ssh, image_type, apt_mirror, pip_index, ca_bundle; None
    keeps lab.yaml's value.
    """

    name = "amphora"
    kind = KIND
    help = "Octavia amphora image"

    def skip_reason(self, lab: Lab, ws: Workspace) -> str | None:
        if not lab.octavia.enabled:
            return "lab.yaml octavia.enabled is false"
        if not lab.octavia.amphora.build:
            return "lab.yaml octavia.amphora.build is false"
        try:
            docker_engine.client(ws)   # connects, or starts dockerd when root (as the build would)
        except LabError as exc:
            return f"no Docker engine: {exc}"
        return None

    def outputs(self, lab: Lab, ws: Workspace, **over) -> list[Output]:
        over = dict(over)
        lab = with_build_settings(lab, apt_mirror=over.pop("apt_mirror", None),
                                  pip_index=over.pop("pip_index", None),
                                  ca_bundle=over.pop("ca_bundle", None),
                                  base_os=over.get("base_os"))
        s = settings(lab, **over)
        return [Output(artifact_path(ws, s), self.kind, "amphora", _inputs(lab, s),
                       data=(lab, s))]

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        return None if super().up_to_date(ctx, out, digest) is None else out.path.name

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        lab, s = out.data
        ws = ctx.ws
        start = time.monotonic()
        docker_engine.confirm_octavia_release(lab, ws, s)   # before any engine is started
        cli = docker_engine.client(ws)
        builder_log = ws.artifact_dir("logs") / "amphora-builder.log"
        with docker_engine.docker_errors("build-amphora"):
            with open(builder_log, "w") as logfh, \
                    progress("amphora: builder image", None, "s") as bar:
                tag = docker_engine.ensure_builder(lab, ws, cli, s, logfh, bar)
            tmp = stage.file(out.path)
            log_path = dib.disk_image_create(
                lab, ws, name="amphora", elements=elements(s), output=tmp,
                image_type=s["image_type"], image_size=s["size"], arch=s["arch"],
                env=dib_settings(lab, s, _cache(ws)), distro=s["base_os"], host_ca=False,
                tmpfs=True, container=dib.in_builder(cli, tag, docker_engine.BUILDER_ELEMENTS_PATH),
                label="amphora",
                no_space=f"at --size {s['size']} GB; give a larger --size (octavia.amphora.size)")
            meta = _inspect(cli, tag, tmp, s)
        meta["log"] = str(log_path.relative_to(ws.artifacts))
        # the cache: this release is known good; other package layers are stale
        docker_engine.remember_octavia_release(lab, ws, s)
        layer = layer_name(lab, s)
        if layer:
            dib.prune_layers(_cache(ws) / "layers" / layer)
        secs = time.monotonic() - start
        return Built(f"{out.path.name}, {tmp.stat().st_size / 2**20:.0f} MiB, "
                     f"{s['base_os']} {s['release']}, octavia {meta['octavia_version']}, "
                     f"{secs / 60:.1f} min", meta=meta,
                     tools={"diskimage-builder": docker_engine.DIB_VERSION,
                            "docker": docker_engine.engine_version(cli), "builder-image": tag})


AMPHORA = Amphora()


def build_builder_base(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """``invoke builder-base``: see :func:`builders.tools.docker_engine.build_builder_base`."""
    return docker_engine.build_builder_base(lab, ws, force=force)


def build_amphora(lab: Lab, ws: Workspace, *, force: bool = False, **over) -> list[Outcome]:
    """Build the amphora image (see :class:`Amphora` for the options)."""
    return run(AMPHORA, lab, ws, force=force, **over)


def _inspect(cli, tag: str, built: Path, s: dict) -> dict:
    info = qemu_img.info(built)
    try:
        octavia_version = cli.containers.run(
            tag, ["sh", "-c", "cd /opt/labforge/src/octavia && "
                  "(sed -n 's/^Version: //p' PKG-INFO 2>/dev/null | head -1; git rev-parse --short HEAD)"],
            remove=True, network_mode="none").decode().split()
    except Exception:  # noqa: BLE001 - informational
        octavia_version = []
    version = s["octavia_version"] if not s["octavia_git"] else (
        f"{s['octavia_git']}@{s['octavia_ref'] or 'HEAD'}")
    if octavia_version and not s["octavia_git"] and octavia_version[0] != version:
        version = octavia_version[0]
    return {
        "virtual_size": info.get("virtual-size"),
        "format": info.get("format"),
        "base_os": s["base_os"], "release": s["release"], "arch": s["arch"],
        "octavia_version": version,
        "octavia_lib_version": docker_engine.OCTAVIA_LIB_VERSION,
        "elements": elements(s),
        "dib_version": docker_engine.DIB_VERSION,
        "agent": s["agent"], "ssh": s["ssh"], "size_gb": s["size"],
    }
