"""The Octavia amphora image, built with diskimage-builder in a container.

``build_builder_base`` makes the local Debian base image the builder image
starts FROM (debootstrap into a folder, ``docker import``), because no
container registry is reachable where labforge builds.

``build_amphora`` builds (or reuses) the builder image
(``dockerfiles/amphora/Dockerfile``: diskimage-builder pinned, Octavia's
elements and agent source from the Octavia sdist on PyPI, labforge's local
elements) through the Docker Engine API, then runs ``disk-image-create`` in
a privileged container with upstream's element list for the amphora plus
labforge's local elements that fill the Debian gaps.  The output directory
and a persistent cache (``cache/amphora``: DIB image cache with the
debootstrap tarball, apt archives, pip cache and source repositories) are
mounted.  The image is written under a temporary name and renamed into
``artifacts/images/amphora-x64-haproxy.qcow2``.

Why disk-image-create directly rather than upstream's diskimage-create.sh:
the script refuses a Debian base (``-i`` accepts ubuntu/fedora/centos/rhel/
rocky only), hard-wires the element list and environment, and offers no
hook for a persistent debootstrap tarball; calling disk-image-create with
the same element list keeps upstream's elements while making Debian
buildable and the build cacheable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from builders.tools import docker_engine

from builders.core import extcmd, resources
from builders.core.console import progress
from builders.tools.dib import (DEBIAN_MINIMAL_LAYER, ca_bundle, compress_qcow2, debian_mirrors, failing_script,
                  has_device_mapper, package_layer, proxy_environment, prune_layers)
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write
from builders.core.lab import Lab
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

log = logging.getLogger("labforge")

DIB_VERSION = "3.43.0"             # diskimage-builder in the builder image
OCTAVIA_LIB_VERSION = "3.12.0"     # octavia-lib sdist the agent is installed with
BASE_RELEASE = "bookworm"
BASE_REPO = "labforge/debian-base"
BASE_TAG = f"{BASE_REPO}:{BASE_RELEASE}"
BUILDER_REPO = "labforge/amphora-builder"
DOCKERFILE_DIR = resources.dockerfiles("amphora")
DIB_BIN_DIR = resources.dockerfiles("dib", "bin")
BUILDER_STANDIN_DIR = "/opt/labforge/dib-bin"   # DIB_BIN_DIR inside the builder image
IMAGE_NAME = "amphora-x64-haproxy"
MIN_SIZE_GB = 2                    # a Debian amphora uses ~1.4 GB of its root fs

DEFAULT_RELEASES = {"debian": "bookworm", "ubuntu": "noble"}
BASE_ELEMENTS = {"debian": "debian-minimal", "ubuntu": "ubuntu-minimal"}
ARCHES = ("amd64", "arm64")

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
    *DEBIAN_MINIMAL_LAYER,
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

_RUNNING = re.compile(r"Running (/\S+/([a-z-]+)\.d/(\S+))")
_HOOKS = re.compile(r"Running hooks from \S+/([a-z-]+)\.d")
_NOSPACE = re.compile(r"No space left on device|not enough free space", re.I)


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
    if s["base_os"] not in BASE_ELEMENTS:
        raise LabError(f"--base-os {s['base_os']}: unknown base OS; use one of "
                       f"{', '.join(BASE_ELEMENTS)}")
    if over.get("base_os") and not over.get("release") and s["base_os"] != a.base_os:
        s["release"] = DEFAULT_RELEASES[s["base_os"]]
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
# builder-base: debootstrap + docker import
# --------------------------------------------------------------------------
def build_builder_base(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Make the local Debian base image (``labforge/debian-base:bookworm``)."""
    t0 = time.monotonic()
    cli = docker_engine.client(ws)
    main, sec = debian_mirrors(lab)
    digest = input_digest("builder-base", 1, BASE_RELEASE, main, sec)
    state_file = ws.cache_dir("builder-base") / "state.json"
    state = _read_json(state_file)
    if not force and state.get("digest") == digest and _image_id(cli, BASE_TAG) == state.get("id"):
        return [Outcome("builder-base", "up to date", detail=BASE_TAG)]
    extcmd.require("debootstrap")
    logpath = ws.artifact_dir("logs") / "builder-base.log"
    with BuildLock(ws), open(logpath, "w") as logfh, progress("builder-base", None, "s") as bar:
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
    image_id = _image_id(cli, BASE_TAG)
    if image_id is None:
        raise LabError(f"builder-base: docker import did not produce {BASE_TAG}; see {logpath}")
    atomic_write(state_file, json.dumps({"digest": digest, "id": image_id, "mirror": main}))
    return [Outcome("builder-base", "built", detail=f"{BASE_TAG} from {main}",
                    seconds=time.monotonic() - t0)]


# --------------------------------------------------------------------------
# the builder image
# --------------------------------------------------------------------------
def _image_id(cli, ref: str) -> str | None:
    from docker.errors import ImageNotFound
    try:
        return cli.images.get(ref).id
    except ImageNotFound:
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pip_index(lab: Lab) -> str:
    return (lab.build.pip_index or "https://pypi.org/simple").rstrip("/")


def check_octavia_release(lab: Lab, version: str) -> None:
    """LabError when the package index has no Octavia sdist of that version."""
    import requests
    url = _pip_index(lab)
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


def _release_memo(lab: Lab, ws: Workspace, s: dict) -> tuple[Path, str]:
    """The file of confirmed releases and this one's line (index without its password)."""
    return (ws.cache / "amphora" / "octavia-releases",
            f"{extcmd.safe_url(_pip_index(lab))} {s['octavia_version']}")


def confirm_octavia_release(lab: Lab, ws: Workspace, s: dict) -> None:
    """Check the Octavia release against the package index, unless a build
    with it already succeeded (then a rebuild works without the index).

    Runs before the Docker engine is contacted, so a typo in the version is
    one error line and never starts dockerd.
    """
    if s["octavia_git"]:
        return
    memo, key = _release_memo(lab, ws, s)
    try:
        if key in memo.read_text().splitlines():
            return
    except FileNotFoundError:
        pass
    check_octavia_release(lab, s["octavia_version"])


def _remember_octavia_release(lab: Lab, ws: Workspace, s: dict) -> None:
    memo, key = _release_memo(lab, ws, s)
    if s["octavia_git"] or (memo.exists() and key in memo.read_text().splitlines()):
        return
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo, "a") as fh:
        fh.write(key + "\n")


def builder_inputs(lab: Lab, s: dict) -> dict:
    """Everything the builder image is made from (its tag is a digest of this)."""
    bundle = ca_bundle(lab)
    return {
        "dockerfile": DOCKERFILE_DIR / "Dockerfile",
        "elements": DOCKERFILE_DIR / "elements",
        "bin": DOCKERFILE_DIR / "bin",
        "dib_bin": DIB_BIN_DIR,
        "ca_bundle": bundle if bundle else None,
        "dib_version": DIB_VERSION,
        "octavia_version": None if s["octavia_git"] else s["octavia_version"],
        "octavia_git": s["octavia_git"], "octavia_ref": s["octavia_ref"],
        "octavia_lib_version": OCTAVIA_LIB_VERSION,
        "pip_index": lab.build.pip_index,
    }


def builder_from(lab: Lab) -> str:
    """The image the builder starts FROM: build.builder_from, else the local base."""
    return lab.build.builder_from or BASE_TAG


def builder_tag(lab: Lab, cli, s: dict) -> str | None:
    """Tag of the builder image for these settings when the engine has it, else None.

    No side effects: builds nothing, contacts no package index.
    """
    base_id = _image_id(cli, builder_from(lab))
    if base_id is None:
        return None
    tag = f"{BUILDER_REPO}:{input_digest(builder_inputs(lab, s), base_id)[:16]}"
    return tag if _image_id(cli, tag) is not None else None


def _base_for_builder(lab: Lab, ws: Workspace, cli, bar) -> str:
    """The id of the FROM image: the local base (made when missing) or
    build.builder_from (pulled when the engine does not have it)."""
    ref = builder_from(lab)
    base_id = _image_id(cli, ref)
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
    base_id = _image_id(cli, ref)
    if base_id is None:
        raise LabError(f"build.builder_from: the engine has no {ref} after pulling it")
    return base_id


def ensure_builder(lab: Lab, ws: Workspace, cli, s: dict, logfh, bar) -> str:
    """Tag of the builder image, building it when absent."""
    existing = builder_tag(lab, cli, s)
    if existing is not None:
        return existing
    inputs = builder_inputs(lab, s)
    confirm_octavia_release(lab, ws, s)
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
                "OCTAVIA_VERSION": s["octavia_version"], "OCTAVIA_LIB_VERSION": OCTAVIA_LIB_VERSION,
                "OCTAVIA_GIT": s["octavia_git"] or "", "OCTAVIA_REF": s["octavia_ref"] or "",
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


# --------------------------------------------------------------------------
# the amphora
# --------------------------------------------------------------------------
def elements(s: dict) -> list[str]:
    out = list(UPSTREAM_ELEMENTS[:2]) + [BASE_ELEMENTS[s["base_os"]]] + list(UPSTREAM_ELEMENTS[2:])
    if s["base_os"] == "ubuntu":
        out.append("amphora-apparmor")
    if not s["ssh"]:
        out.append("remove-sshd")
    out += LOCAL_ELEMENTS
    if s["base_os"] == "debian":
        out += DEBIAN_ELEMENTS
    return out


def dib_environment(lab: Lab, s: dict) -> dict[str, str]:
    """The environment disk-image-create runs with inside the container."""
    env = {
        "ELEMENTS_PATH": "/opt/labforge/src/octavia/elements:/opt/labforge/elements",
        "DIB_RELEASE": s["release"],
        "DIB_IMAGE_CACHE": "/cache/dib",
        "DIB_DEBOOTSTRAP_CACHE": "1",                 # write the tarball ...
        "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",      # ... and start from it next time
        "DIB_CLOUD_INIT_DATASOURCES": "ConfigDrive",
        "DIB_GRUB_TIMEOUT": "0",
        "DIB_OCTAVIA_AMP_USE_NFTABLES": "True",
        "DIB_OCTAVIA_AMP_USE_SSH": "True" if s["ssh"] else "False",
        "DIB_REPOLOCATION_amphora_agent": "/opt/labforge/src/octavia",
        "DIB_REPOREF_amphora_agent": "labforge",
        "DIB_REPOLOCATION_octavia_lib": "/opt/labforge/src/octavia-lib",
        "DIB_REPOREF_octavia_lib": "labforge",
        "DIB_REPOLOCATION_upper_constraints": "file:///opt/labforge/upper-constraints.txt",
        "LABFORGE_KEEP_CA_BUNDLE": "1" if lab.build.keep_ca_bundle else "0",
    }
    if s["base_os"] == "debian":
        main, sec = debian_mirrors(lab)
        env["DIB_DISTRIBUTION_MIRROR"] = main
        env["DIB_DEBIAN_SECURITY_MIRROR"] = sec
        layer = layer_name(lab, s)
        if layer:
            env["DIB_IMAGE_CACHE"] = f"/cache/dib/layers/{layer}"
            env["DIB_MMDEBSTRAP_EXTRA_ARGS"] = package_layer(s["release"], main, sec, LAYER_PACKAGES)[1]
    else:
        env["DIB_UBUNTU_KERNEL"] = "linux-image-virtual"
        if lab.build.ubuntu_mirror:
            env["DIB_DISTRIBUTION_MIRROR"] = lab.build.ubuntu_mirror
    if ca_bundle(lab):
        env["LABFORGE_BUILD_CA"] = "/usr/local/share/labforge/build-ca.crt"
    if lab.build.pip_index:
        env["PIP_INDEX_URL"] = lab.build.pip_index
    if s["agent"] == "package":
        env["DIB_INSTALLTYPE_amphora_agent"] = "package"
        if s["base_os"] == "debian":
            env["LABFORGE_RENAME_PACKAGES"] = "amphora-agent=octavia-agent"
    return env


def layer_name(lab: Lab, s: dict) -> str | None:
    """The package layer's directory under cache/amphora/dib/layers, or None
    when this build does not use one (see LAYER_PACKAGES)."""
    if s["base_os"] != "debian" or s["arch"] != "amd64" or s["agent"] != "source" \
            or s["octavia_git"] or s["octavia_version"] != LAYER_OCTAVIA_VERSION:
        return None
    main, sec = debian_mirrors(lab)
    return package_layer(s["release"], main, sec, LAYER_PACKAGES)[0]


def standin_prefix() -> str:
    """Shell that puts the kpartx/dmsetup stand-ins first on PATH inside the
    builder container, on kernels without device-mapper (the container shares
    the host's kernel, so the host's test decides); empty elsewhere."""
    if has_device_mapper():
        return ""
    return (f"export PATH={BUILDER_STANDIN_DIR}:$PATH; "
            "echo 'labforge: no device-mapper: kpartx/dmsetup via partx stand-ins'; ")


def build_command(s: dict, out_stem: str) -> str:
    """The shell line the container runs."""
    els = " ".join(elements(s))
    return (f"set -e; {standin_prefix()}"
            f"exec disk-image-create -a {s['arch']} -t {s['image_type']} "
            f"{'-u ' if s['image_type'] == 'qcow2' else ''}"   # compressed by labforge, on every core
            f"--image-size {s['size']} -o /out/{out_stem} {els}")


def image_digest(lab: Lab, s: dict) -> str:
    """Digest of every input of the amphora (settings, builder inputs, env)."""
    env = dict(dib_environment(lab, s))
    return input_digest("amphora", 1, s, builder_inputs(lab, s), elements(s), env)


def build_amphora(lab: Lab, ws: Workspace, *, force: bool = False, **over) -> list[Outcome]:
    """Build ``artifacts/images/amphora-x64-haproxy.qcow2`` (see module doc).

    ``over`` takes the options of ``invoke build-amphora`` (base_os, release,
    arch, size, agent, ssh, image_type); None keeps lab.yaml's value.
    """
    t0 = time.monotonic()
    lab = with_build_settings(lab, apt_mirror=over.pop("apt_mirror", None),
                              pip_index=over.pop("pip_index", None),
                              ca_bundle=over.pop("ca_bundle", None),
                              base_os=over.get("base_os"))
    s = settings(lab, **over)
    target = artifact_path(ws, s)
    digest = image_digest(lab, s)
    manifest = Manifest(ws.artifacts)
    if not force and manifest.is_current(target, digest):
        return [Outcome("amphora", "up to date", [target], detail=target.name)]
    confirm_octavia_release(lab, ws, s)
    cli = docker_engine.client(ws)
    cache = ws.cache_dir("amphora")
    logpath = ws.artifact_dir("logs") / "amphora.log"
    with BuildLock(ws), open(logpath, "w") as logfh, progress("amphora", None, "s") as bar, \
            _docker_errors("build-amphora"):
        tag = ensure_builder(lab, ws, cli, s, logfh, bar)
        target.parent.mkdir(parents=True, exist_ok=True)
        outdir = Path(tempfile.mkdtemp(prefix=f".{IMAGE_NAME}.", suffix=".part", dir=target.parent))
        try:
            built = _run_dib(cli, tag, lab, s, cache, outdir, logfh, bar)
            if s["image_type"] == "qcow2":
                bar.set_description("compressing (qemu-img convert -c)")
                compress_qcow2(built, outdir / "compressed.qcow2", what="amphora")
                os.replace(outdir / "compressed.qcow2", built)
            meta = _inspect(cli, tag, built, s)
            os.chmod(built, 0o644)
            os.replace(built, target)
        except BaseException:
            raise
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        bar.set_description("hashing")
        manifest.record(target, "amphora", digest,
                        tools={"diskimage-builder": DIB_VERSION, "docker": docker_engine.engine_version(cli),
                               "builder-image": tag},
                        meta=meta)
        _remember_octavia_release(lab, ws, s)
        layer = layer_name(lab, s)
        if layer:
            prune_layers(cache / "dib" / "layers" / layer)
    secs = time.monotonic() - t0
    return [Outcome("amphora", "built", [target],
                    detail=f"{target.name}, {target.stat().st_size / 2**20:.0f} MiB, "
                           f"{s['base_os']} {s['release']}, octavia {meta['octavia_version']}, "
                           f"{secs / 60:.1f} min", seconds=secs)]


@contextlib.contextmanager
def _docker_errors(what: str):
    """A Docker Engine API error becomes one user line."""
    from docker.errors import DockerException
    try:
        yield
    except DockerException as exc:
        text = getattr(exc, "explanation", None) or str(exc)
        raise LabError(f"{what}: docker: {str(text).strip().splitlines()[-1]}") from None


def _run_dib(cli, tag: str, lab: Lab, s: dict, cache: Path, outdir: Path, logfh, bar) -> Path:
    stem = IMAGE_NAME
    env = dib_environment(lab, s)
    volumes = {"/dev": {"bind": "/dev", "mode": "rw"},
               str(cache): {"bind": "/cache", "mode": "rw"},
               str(outdir): {"bind": "/out", "mode": "rw"}}
    phase = "starting"

    def on_line(line: str) -> None:
        nonlocal phase
        m = _RUNNING.search(line)
        if m:
            new = f"{m.group(2)}.d {m.group(3)}"
        elif "Creating partition" in line or "block_device" in line and "INFO" in line:
            new = "block-device"
        elif "Converting image using qemu-img" in line:
            new = f"qemu-img convert to {s['image_type']}"
        else:
            new = None
        if new and new != phase:
            phase = new
            bar.set_description(phase)

    code, lines = docker_engine.run_streaming(
        cli, tag, ["bash", "-c", build_command(s, stem)], logfh=logfh, on_line=on_line,
        network_mode="host", environment={**proxy_environment(), **env}, volumes=volumes,
        labels={"org.labforge.kind": "amphora-build"}, working_dir="/build", **device_access())
    if code != 0:
        stamp = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ \| ")
        tail = [t for t in (stamp.sub("", ln) for ln in lines)
                if t.strip() and "PROFILING" not in t and "INFO diskimage_builder" not in t
                and not t.startswith("+") and "Sourcing environment file" not in t]
        tail = tail[-extcmd.TAIL_LINES:]
        if any(_NOSPACE.search(ln) for ln in lines[-200:]):
            raise LabError(f"amphora: the image ran out of space at --size {s['size']} GB; "
                           f"give a larger --size (octavia.amphora.size); full log: {logfh.name}", tail)
        script = failing_script(lines)
        where = f"element script {script} failed" if script else f"disk-image-create exited {code}"
        raise LabError(f"amphora: {where}; full log: {logfh.name}", tail)
    ext = "qcow2" if s["image_type"] == "qcow2" else "raw"
    built = outdir / f"{stem}.{ext}"
    if not built.is_file():
        raise LabError(f"amphora: disk-image-create finished but wrote no {built.name}; "
                       f"full log: {logfh.name}")
    return built


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


def _inspect(cli, tag: str, built: Path, s: dict) -> dict:
    info = json.loads(extcmd.run(["qemu-img", "info", "--output=json", built],
                                 what="amphora: qemu-img info").stdout)
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
        "octavia_lib_version": OCTAVIA_LIB_VERSION,
        "elements": elements(s),
        "dib_version": DIB_VERSION,
        "agent": s["agent"], "ssh": s["ssh"], "size_gb": s["size"],
    }
