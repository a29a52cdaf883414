"""The base cloud image every lab VM's overlay is backed by.

Two sources, chosen by lab.yaml ``base_image.source``:

``download``
    The distribution's published cloud image (Debian genericcloud, Ubuntu
    server cloudimg) from its official URL or ``base_image.url`` (a mirror
    directory holding the image and its checksum file).  The download is
    streamed with requests in constant memory into ``cache/downloads/`` as a
    ``.part`` file, resumed with an HTTP Range request after an interruption,
    retried with backoff, and verified against the published SHA512SUMS
    (Debian) / SHA256SUMS (Ubuntu; its signature is checked with gpgv when
    gpgv and the Ubuntu cloud image keyring are present).  A mismatch
    deletes the download and says so.

``build``
    A Debian cloud image built here with diskimage-builder (debian-minimal,
    vm, cloud-init, NoCloud/ConfigDrive/OpenStack datasources, growroot,
    openssh-server) from the machine's Debian mirror, for machines that
    cannot download images.  See :mod:`builders.tools.dib`.  Where DIB runs is
    ``base_image.builder`` (:func:`dib_place`): on the host (``.venv-dib``)
    or in the amphora builder container (same DIB, same elements, same
    command line), ``auto`` choosing the container only when its image is
    already in a running local Docker engine.

Output: ``artifacts/images/<distro>-<version>.qcow2`` (``debian-12``,
``ubuntu-24.04``: the name hosts use in ``image:``), recorded in the
manifest with its sha256, virtual size and where it came from.  The builder
is :data:`BASE_IMAGE` (:mod:`builders.core.contract`): it declares that one
output and produces the file; the contract's runner locks, checks, stages,
renames and records.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders.core import extcmd
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.fsutil import atomic_path, atomic_write, sha256_file
from builders.core.lab import Lab
from builders.core.manifest import input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace
from builders.tools import dib, distros, docker_engine, download, qemu_img
from builders.tools.buildenv import ca_bundle
from builders.tools.distros import Release

# the DIB elements of the `build` source
BUILD_ELEMENTS = (distros.DEBIAN.dib_element, "vm", "cloud-init", "cloud-init-datasources",
                  "growroot", "openssh-server")
BUILD_PACKAGES = ("ifupdown", "isc-dhcp-client")   # cloud-init's ENI renderer brings NICs up

# The package layer (dib.package_layer): what those elements install, given
# to mmdebstrap (--include) so the first build caches a root that already
# holds them (DIB's bootstrap tarball).  A later build starts from that root:
# apt dist-upgrades it, finds every package installed, and skips ~60 s of
# downloads, dpkg runs and initramfs generations.  The image's package set
# was compared with a plain DIB build (docs/images.md).
LAYER_PACKAGES = (
    *dib.DEBIAN_MINIMAL_LAYER,
    "locales", "adduser", "ca-certificates", "cloud-init", "cloud-utils",
    "e2fsprogs", "rsync",                                              # growroot, install-static
    "openssh-server", "openssh-client",                                # openssh-server
    *BUILD_PACKAGES,
)


def release(lab: Lab) -> Release:
    """The lab's base image release; an unknown one is a one-line error."""
    bi = lab.base_image
    distro = distros.get(bi.distro)
    rel = distro.release(str(bi.release), cloud=True)
    if rel is not None:
        return rel
    known = ", ".join(f"{v} ({c})" for v, c in distro.known(cloud=True).items())
    raise LabError(f"{lab.source.name}: base_image.release: {bi.release!r} is not a known "
                   f"{bi.distro} release; use one of {known}")


def image_path(lab: Lab, ws: Workspace) -> Path:
    return ws.artifacts / "images" / f"{release(lab).name}.qcow2"


KIND = "base-image"


class BaseImage(Builder):
    """``artifacts/images/<distro>-<version>.qcow2`` from the lab's source."""

    name = "base-image"
    kind = KIND
    help = "base cloud image"

    def outputs(self, lab: Lab, ws: Workspace, **_) -> list[Output]:
        rel = release(lab)
        bi = lab.base_image
        if bi.source == "build" and bi.distro != "debian":
            raise LabError(f"{lab.source.name}: base_image: the build source makes Debian images; "
                           "set base_image.distro: debian or base_image.source: download")
        if bi.source == "download":
            inputs = _download_inputs(lab, rel)
            plan = (rel, None)
        else:
            place = dib_place(lab)
            inputs = _build_inputs(lab, rel, place.dib_version)
            plan = (rel, place)
        return [Output(image_path(lab, ws), self.kind, f"base-image {rel.name}", inputs,
                       data=plan)]

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        lab, ws = ctx.lab, ctx.ws
        rel, place = out.data
        source = lab.base_image.source
        start = time.monotonic()
        tmp = stage.file(out.path)
        if place is None:
            meta = _download(lab, ws, rel, tmp)
            tools = {"requests": download.requests_version()}
        else:
            meta, tools = _build(lab, ws, rel, tmp, out.digest(), ctx.force, place)
        info = qemu_img.info(tmp)
        if info.get("format") != "qcow2":
            raise LabError(f"{out.path}: the {source}ed image is {info.get('format')}, not qcow2")
        meta.update({"distro": rel.distro, "release": rel.version, "codename": rel.codename,
                     "source": source, "format": "qcow2",
                     "virtual_size": info["virtual-size"]})
        how = "build reused from cache/dib/images" if meta.get("reused_from_cache") else source
        if meta.get("builder", "host") != "host" and not meta.get("reused_from_cache"):
            how = f"build in {meta['builder']}"
        return Built(f"{how}, {info['virtual-size'] / 2**30:.1f} GiB virtual, "
                     f"{time.monotonic() - start:.0f}s", meta=meta, tools=tools)


BASE_IMAGE = BaseImage()


def build_base_image(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Make ``artifacts/images/<distro>-<version>.qcow2`` from the lab's source."""
    return run(BASE_IMAGE, lab, ws, force=force)


def _download_inputs(lab: Lab, rel: Release) -> tuple:
    return ("download", rel.distro, rel.version, _base_url(lab, rel))


# --------------------------------------------------------------------------
# build (diskimage-builder)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Place:
    """Where the ``build`` source runs diskimage-builder."""
    kind: str                      # "host" | "container"
    dib_version: str | None        # of the DIB that runs there (an input of the image)
    cli: Any = None                # container, found by `auto`: the engine holding ...
    tag: str | None = None         # ... this builder image


def _build_inputs(lab: Lab, rel: Release, dib_version: str | None) -> tuple:
    """Inputs of the ``build`` source.  Where DIB runs is not one (same DIB,
    same elements, same command line); the DIB version of the place that
    runs it is, so switching between a host and a container whose DIB
    differs rebuilds."""
    main, sec = distros.debian_mirrors(lab)
    return ("build", rel.distro, rel.version, lab.base_image.size,
            main, sec, BUILD_ELEMENTS, build_packages(lab), dib_version)


def build_packages(lab: Lab) -> tuple[str, ...]:
    """What the `build` source installs: BUILD_PACKAGES and base_image.packages
    (the default lab bakes the brokers' ZooKeeper in; docs/kafka-lab.md)."""
    return (*BUILD_PACKAGES, *[p for p in lab.base_image.packages if p not in BUILD_PACKAGES])


def build_digest(lab: Lab, rel: Release, dib_version: str | None) -> str:
    """Input digest of the ``build`` source (see :func:`_build_inputs`)."""
    return input_digest(KIND, *_build_inputs(lab, rel, dib_version))


def dib_place(lab: Lab) -> Place:
    """Decide where DIB runs from ``base_image.builder``; starts nothing.

    ``host``: ``.venv-dib``.  ``container``: the amphora builder image (made
    later, by :func:`_build`, when missing).  ``auto``: the host when it has
    diskimage-builder; else the container when an engine already answers
    (dockerd is never started for this) and holds the builder image
    ``docker_engine.ensure_builder`` would use for this lab; else the host,
    whose missing DIB is then the error.
    """
    mode = lab.base_image.builder
    if mode == "container":
        return Place("container", docker_engine.DIB_VERSION)
    if mode == "auto" and not _host_has_dib():
        cli = docker_engine.reachable()
        if cli is not None:
            try:
                with docker_engine.docker_errors("base-image"):
                    tag = docker_engine.builder_tag(lab, cli)
            except LabError as exc:     # e.g. odd octavia.amphora settings: not our business
                extcmd.log.debug("base-image: builder image not usable: %s", exc)
                tag = None
            if tag is not None:
                return Place("container", docker_engine.DIB_VERSION, cli, tag)
    return Place("host", dib.dib_version())


def _host_has_dib() -> bool:
    try:
        dib.dib_executable()
    except LabError:
        return False
    return True


def _builder_container(lab: Lab, ws: Workspace, rel: Release, place: Place) -> dib.InContainer:
    """The builder image to run DIB in: the one `auto` found, else made like
    ``invoke build-amphora`` makes it (dockerd started when none runs)."""
    with docker_engine.docker_errors("base-image"):
        cli, tag = place.cli, place.tag
        if tag is None:
            cli = docker_engine.client(ws)
            logpath = ws.artifact_dir("logs") / f"base-image-{rel.name}-builder.log"
            with open(logpath, "w") as logfh, \
                    progress(f"base-image {rel.name}: builder image", None, "s") as bar:
                tag = docker_engine.ensure_builder(lab, ws, cli, None, logfh, bar)
        return dib.in_builder(cli, tag)


def _tools(meta: dict, dib_version: str | None, cli=None) -> dict:
    tools = {"diskimage-builder": dib_version, "qemu-img": extcmd.tool_version("qemu-img")}
    if meta.get("builder", "host") != "host":
        tools["builder-image"] = meta["builder"]
        if cli is not None:
            tools["docker"] = docker_engine.engine_version(cli)
    return tools


def _build(lab: Lab, ws: Workspace, rel: Release, target: Path, digest: str,
           force: bool, place: Place) -> tuple[dict, dict]:
    """Build with DIB where ``place`` says into ``target`` (a staged file),
    or reuse the image an earlier build with the same inputs left in
    ``cache/dib/images/`` (a CI job that keeps cache/ but starts with an
    empty artifacts/).  ``force`` always builds.  Returns (meta, tools) for
    the manifest."""
    cache_dir = ws.cache_dir("dib", "images")
    cached = cache_dir / f"{rel.name}-{digest[:16]}.qcow2"
    sidecar = cached.with_suffix(".json")
    if not force and cached.is_file() and sidecar.is_file():
        try:
            known = json.loads(sidecar.read_text())
        except ValueError:
            known = {}
        if known.get("sha256") and sha256_file(cached) == known["sha256"]:
            shutil.copyfile(cached, target)
            meta = {**known.get("meta", {}), "reused_from_cache": True}
            if not (ws.artifacts / meta.get("log", "")).is_file():
                meta.pop("log", None)           # that build's log went with its artifacts/
            return meta, _tools(meta, place.dib_version)
    container = _builder_container(lab, ws, rel, place) if place.kind == "container" else None
    layer = _package_layer(lab, ws, rel, on_host=container is None)
    with docker_engine.docker_errors("base-image"):
        log = dib.disk_image_create(
            lab, ws, name=f"base-image-{rel.name}", elements=BUILD_ELEMENTS, output=target,
            packages=build_packages(lab), image_size=lab.base_image.size,
            env={"DIB_RELEASE": rel.codename, "DIB_GRUB_TIMEOUT": "1", **layer},
            label=f"base-image {rel.name}", container=container,
            no_space=f"at {lab.base_image.size} GB; raise base_image.size")
    dib.prune_layers(Path(layer["DIB_IMAGE_CACHE"]))
    main, sec = distros.debian_mirrors(lab)
    meta = {"elements": list(BUILD_ELEMENTS), "packages": list(build_packages(lab)),
            "mirror": main, "security_mirror": sec,
            "builder": container.image if container else "host",
            "log": str(log.relative_to(ws.artifacts))}
    # keep a copy for the next build with these inputs; only the newest per release
    for old in cache_dir.glob(f"{rel.name}-*.qcow2"):
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    with atomic_path(cached) as tmp:
        shutil.copyfile(target, tmp)
    atomic_write(sidecar, json.dumps({"sha256": sha256_file(cached), "meta": meta}) + "\n")
    return meta, _tools(meta, place.dib_version, container.cli if container else None)


def _package_layer(lab: Lab, ws: Workspace, rel: Release, *, on_host: bool = True) -> dict[str, str]:
    """DIB settings for the base image's cached package layer (see LAYER_PACKAGES).
    The builder image carries mmdebstrap; the host needs it installed."""
    if on_host:
        extcmd.require("mmdebstrap")
    main, sec = distros.debian_mirrors(lab)
    extra = [p for p in lab.base_image.packages if p not in LAYER_PACKAGES]
    name, args = dib.package_layer(rel.codename, main, sec, (*LAYER_PACKAGES, *extra))
    return {"DIB_IMAGE_CACHE": str(ws.cache_dir("dib", "layers", name)),
            "DIB_MMDEBSTRAP_EXTRA_ARGS": args}


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------
def _base_url(lab: Lab, rel: Release) -> str:
    if lab.base_image.url:
        return lab.base_image.url.rstrip("/") + "/"
    return distros.get(rel.distro).image_url(rel)


def remote_names(rel: Release) -> tuple[str, str, str]:
    """(image file, checksum file, hash algorithm) as published upstream."""
    d = distros.get(rel.distro)
    return d.image_name(rel), d.checksums, d.checksum_algo


def _download(lab: Lab, ws: Workspace, rel: Release, target: Path) -> dict:
    url = _base_url(lab, rel)
    distro = distros.get(rel.distro)
    image_name, sums_name, algo = remote_names(rel)
    bundle = ca_bundle(lab)
    session = download.new_session("labforge (base-image download)",
                                   verify=str(bundle) if bundle and url.startswith("https:") else None)
    expected, sums = download.fetch_checksum(session, url, sums_name, image_name, algo=algo)
    cache = ws.cache_dir("downloads", rel.name)
    signature = None
    if distro.signature:
        signature = download.verify_signature(session, url, sums_name, sums, distro.signature,
                                              distro.keyrings, cache)
    cached = cache / image_name
    if cached.exists():                     # a verified download from an earlier run?
        cached.unlink()
    download.download(url + image_name, cached, expected=expected, algo=algo, session=session,
                      label=f"base-image {rel.name}: {image_name}")
    # the verified file becomes the staged output (the runner renames it into place)
    try:
        os.replace(cached, target)
    except OSError:
        shutil.copyfile(cached, target)
        cached.unlink()
    meta = {"url": url + image_name, algo: expected}
    if signature:
        meta["signature"] = signature
    return meta
