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
    cannot download images.  See :mod:`builders.dib`.  Where DIB runs is
    ``base_image.builder`` (:func:`dib_place`): on the host (``.venv-dib``)
    or in the amphora builder container (same DIB, same elements, same
    command line), ``auto`` choosing the container only when its image is
    already in a running local Docker engine.

Output: ``artifacts/images/<distro>-<version>.qcow2`` (``debian-12``,
``ubuntu-24.04``: the name hosts use in ``image:``), recorded in the
manifest with its sha256, virtual size and where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders.artifacts import amphora

from builders.tools import dib

from builders.tools import docker_engine

from builders.core import extcmd
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.fsutil import CHUNK, atomic_path, atomic_write, sha256_file
from builders.core.lab import Lab
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

# release -> (version used in names, codename)
DEBIAN_RELEASES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
UBUNTU_RELEASES = {"20.04": "focal", "22.04": "jammy", "24.04": "noble"}

DEBIAN_URL = "https://cloud.debian.org/images/cloud/{codename}/latest/"
UBUNTU_URL = "https://cloud-images.ubuntu.com/{codename}/current/"
UBUNTU_KEYRINGS = ("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg",)

# the DIB elements of the `build` source
BUILD_ELEMENTS = ("debian-minimal", "vm", "cloud-init", "cloud-init-datasources",
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

RETRIES = 4          # attempts per request
BACKOFF = 1.0        # seconds, doubled after each failed attempt
TIMEOUT = 30         # seconds of silence before a connection counts as dropped


@dataclass(frozen=True)
class Release:
    distro: str
    version: str       # "12", "24.04"
    codename: str      # "bookworm", "noble"

    @property
    def name(self) -> str:
        return f"{self.distro}-{self.version}"


def release(lab: Lab) -> Release:
    """The lab's base image release; an unknown one is a one-line error."""
    bi = lab.base_image
    table = DEBIAN_RELEASES if bi.distro == "debian" else UBUNTU_RELEASES
    wanted = str(bi.release).strip().lower()
    for version, codename in table.items():
        if wanted in (version, codename):
            return Release(bi.distro, version, codename)
    known = ", ".join(f"{v} ({c})" for v, c in table.items())
    raise LabError(f"{lab.source.name}: base_image.release: {bi.release!r} is not a known "
                   f"{bi.distro} release; use one of {known}")


def image_path(lab: Lab, ws: Workspace) -> Path:
    return ws.artifacts / "images" / f"{release(lab).name}.qcow2"


def build_base_image(lab: Lab, ws: Workspace, *, force: bool = False) -> list[Outcome]:
    """Make ``artifacts/images/<distro>-<version>.qcow2`` from the lab's source."""
    rel = release(lab)
    bi = lab.base_image
    if bi.source == "build" and bi.distro != "debian":
        raise LabError(f"{lab.source.name}: base_image: the build source makes Debian images; "
                       "set base_image.distro: debian or base_image.source: download")
    target = image_path(lab, ws)
    step = f"base-image {rel.name}"
    if bi.source == "download":
        digest = input_digest("base-image/download", rel.distro, rel.version, _base_url(lab, rel))
    else:
        place = dib_place(lab)
        digest = build_digest(lab, rel, place.dib_version)
    manifest = Manifest(ws.artifacts)
    with BuildLock(ws):
        if not force and manifest.is_current(target, digest):
            return [Outcome(step, "up to date", [target])]
        start = time.monotonic()
        if bi.source == "download":
            meta = _download(lab, ws, rel, target)
            tools = {"requests": _requests_version()}
        else:
            meta, tools = _build(lab, ws, rel, target, digest, force, place)
        info = qemu_info(target)
        if info.get("format") != "qcow2":
            target.unlink(missing_ok=True)
            raise LabError(f"{target}: the {bi.source}ed image is {info.get('format')}, not qcow2")
        meta.update({"distro": rel.distro, "release": rel.version, "codename": rel.codename,
                     "source": bi.source, "format": "qcow2",
                     "virtual_size": info["virtual-size"]})
        manifest.record(target, "base-image", digest, tools=tools, meta=meta)
        secs = time.monotonic() - start
        size = info["virtual-size"] / 2**30
        how = "build reused from cache/dib/images" if meta.get("reused_from_cache") else bi.source
        if meta.get("builder", "host") != "host" and not meta.get("reused_from_cache"):
            how = f"build in {meta['builder']}"
        return [Outcome(step, "built", [target], f"{how}, {size:.1f} GiB virtual, "
                        f"{secs:.0f}s", secs)]


def qemu_info(path: Path) -> dict:
    """``qemu-img info --output=json`` of an image (-U: works while a VM runs)."""
    proc = extcmd.run(["qemu-img", "info", "-U", "--output=json", path],
                      what=f"reading {path.name}")
    return json.loads(proc.stdout)


def qemu_check(path: Path, what: str) -> None:
    """``qemu-img check`` of a qcow2 (reads only its tables, so it is quick):
    a truncated or damaged image is a LabError ending in ``what`` (what to
    do about it).  Leaked clusters (exit status 3) are harmless."""
    chk = extcmd.run(["qemu-img", "check", "-U", path], check=False,
                     what=f"checking image {Path(path).name}")
    if chk.returncode in (0, 3):
        return
    out = chk.stdout + chk.stderr
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    found = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "corrupt" in ln.lower()]
    raise LabError(f"{path}: `qemu-img check` finds the image damaged "
                   f"({found[0].rstrip('.') if found else f'exit status {chk.returncode}'}); {what}")


def _requests_version() -> str:
    import requests
    return requests.__version__


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


def build_digest(lab: Lab, rel: Release, dib_version: str | None) -> str:
    """Input digest of the ``build`` source.  Where DIB runs is not an input
    (same DIB, same elements, same command line); the DIB version of the place
    that runs it is, so switching between a host and a container whose DIB
    differs rebuilds."""
    main, sec = dib.debian_mirrors(lab)
    return input_digest("base-image/build", rel.distro, rel.version, lab.base_image.size,
                        main, sec, BUILD_ELEMENTS, build_packages(lab), dib_version)


def build_packages(lab: Lab) -> tuple[str, ...]:
    """What the `build` source installs: BUILD_PACKAGES and base_image.packages
    (the default lab bakes the brokers' ZooKeeper in; docs/kafka-lab.md)."""
    return (*BUILD_PACKAGES, *[p for p in lab.base_image.packages if p not in BUILD_PACKAGES])


def dib_place(lab: Lab) -> Place:
    """Decide where DIB runs from ``base_image.builder``; starts nothing.

    ``host``: ``.venv-dib``.  ``container``: the amphora builder image (made
    later, by :func:`_build`, when missing).  ``auto``: the host when it has
    diskimage-builder; else the container when an engine already answers
    (dockerd is never started for this) and holds the builder image
    ``amphora.ensure_builder`` would use for this lab; else the host, whose
    missing DIB is then the error.
    """
    mode = lab.base_image.builder
    if mode == "container":
        return Place("container", amphora.DIB_VERSION)
    if mode == "auto" and not _host_has_dib():
        cli = docker_engine.reachable()
        if cli is not None:
            try:
                with amphora._docker_errors("base-image"):
                    tag = amphora.builder_tag(lab, cli, amphora.settings(lab))
            except LabError as exc:     # e.g. odd octavia.amphora settings: not our business
                extcmd.log.debug("base-image: builder image not usable: %s", exc)
                tag = None
            if tag is not None:
                return Place("container", amphora.DIB_VERSION, cli, tag)
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
    with amphora._docker_errors("base-image"):
        cli, tag = place.cli, place.tag
        if tag is None:
            cli = docker_engine.client(ws)
            logpath = ws.artifact_dir("logs") / f"base-image-{rel.name}-builder.log"
            with open(logpath, "w") as logfh, \
                    progress(f"base-image {rel.name}: builder image", None, "s") as bar:
                tag = amphora.ensure_builder(lab, ws, cli, amphora.settings(lab), logfh, bar)
        path = docker_engine.image_path_env(cli, tag)
        if not dib.has_device_mapper():
            path = f"{amphora.BUILDER_STANDIN_DIR}:{path}"
        return dib.InContainer(cli, tag, path, amphora.device_access())


def _tools(meta: dict, dib_version: str | None, cli=None) -> dict:
    tools = {"diskimage-builder": dib_version, "qemu-img": extcmd.tool_version("qemu-img")}
    if meta.get("builder", "host") != "host":
        tools["builder-image"] = meta["builder"]
        if cli is not None:
            tools["docker"] = docker_engine.engine_version(cli)
    return tools


def _build(lab: Lab, ws: Workspace, rel: Release, target: Path, digest: str,
           force: bool, place: Place) -> tuple[dict, dict]:
    """Build with DIB where ``place`` says, or reuse the image an earlier
    build with the same inputs left in ``cache/dib/images/`` (a CI job that
    keeps cache/ but starts with an empty artifacts/).  ``force`` always
    builds.  Returns (meta, tools) for the manifest."""
    cache_dir = ws.cache_dir("dib", "images")
    cached = cache_dir / f"{rel.name}-{digest[:16]}.qcow2"
    sidecar = cached.with_suffix(".json")
    if not force and cached.is_file() and sidecar.is_file():
        try:
            known = json.loads(sidecar.read_text())
        except ValueError:
            known = {}
        if known.get("sha256") and sha256_file(cached) == known["sha256"]:
            with atomic_path(target) as tmp:
                shutil.copyfile(cached, tmp)
            meta = {**known.get("meta", {}), "reused_from_cache": True}
            if not (ws.artifacts / meta.get("log", "")).is_file():
                meta.pop("log", None)           # that build's log went with its artifacts/
            return meta, _tools(meta, place.dib_version)
    container = _builder_container(lab, ws, rel, place) if place.kind == "container" else None
    layer = _package_layer(lab, ws, rel, on_host=container is None)
    with amphora._docker_errors("base-image"):
        log = dib.disk_image_create(
            lab, ws, name=f"base-image-{rel.name}", elements=BUILD_ELEMENTS, output=target,
            packages=build_packages(lab), image_size=lab.base_image.size,
            env={"DIB_RELEASE": rel.codename, "DIB_GRUB_TIMEOUT": "1", **layer},
            label=f"base-image {rel.name}", container=container)
    dib.prune_layers(Path(layer["DIB_IMAGE_CACHE"]))
    main, sec = dib.debian_mirrors(lab)
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
    main, sec = dib.debian_mirrors(lab)
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
    tmpl = DEBIAN_URL if rel.distro == "debian" else UBUNTU_URL
    return tmpl.format(codename=rel.codename)


def remote_names(rel: Release) -> tuple[str, str, str]:
    """(image file, checksum file, hash algorithm) as published upstream."""
    if rel.distro == "debian":
        return f"debian-{rel.version}-genericcloud-amd64.qcow2", "SHA512SUMS", "sha512"
    return f"{rel.codename}-server-cloudimg-amd64.img", "SHA256SUMS", "sha256"


def _session():
    import requests
    s = requests.Session()
    s.headers["User-Agent"] = "labforge (base-image download)"
    return s


def _explain(exc: Exception) -> str:
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "host not found"),
                          ("Temporary failure in name resolution", "host not found"),
                          ("timed out", "timed out"), ("CERTIFICATE_VERIFY_FAILED",
                                                       "TLS certificate not trusted")):
        if needle in text:
            return short
    return type(exc).__name__


def _get(session, url: str, what: str, *, retries: int, backoff: float, **kwargs):
    """GET with retries and backoff; HTTP errors other than 5xx are not retried."""
    import requests
    delay = backoff
    last: Exception | None = None
    for attempt in range(retries):
        try:
            resp = session.get(url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            last = exc
        else:
            if resp.status_code < 500:
                return resp
            last = LabError(f"HTTP {resp.status_code}")
            resp.close()
        if attempt < retries - 1:
            extcmd.log.debug("%s: %s; retrying in %.0fs", what, _explain(last), delay)
            time.sleep(delay)
            delay *= 2
    raise LabError(f"{what}: cannot fetch {url}: {_explain(last)} after {retries} attempts; "
                   "check base_image.url and your network (or use base_image.source: build)")


def fetch_checksum(session, url: str, sums_name: str, image_name: str, *, retries: int,
                   backoff: float, algo: str = "sha512") -> tuple[str, bytes]:
    """The expected hex digest of ``image_name`` from the checksum file at ``url``."""
    resp = _get(session, url + sums_name, "base-image", retries=retries, backoff=backoff)
    if resp.status_code != 200:
        raise LabError(f"base-image: {url}{sums_name}: HTTP {resp.status_code}; "
                       "check base_image.url and base_image.release")
    body = resp.content
    for line in body.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == image_name:
            value = parts[0].lower()
            if len(value) != hashlib.new(algo).digest_size * 2 or \
                    not all(c in "0123456789abcdef" for c in value):
                raise LabError(f"base-image: {url}{sums_name}: the entry for {image_name} is not "
                               f"a {algo} digest ({len(value)} characters); the checksum file "
                               "is damaged: check base_image.url or try again later")
            return value, body
    raise LabError(f"base-image: {url}{sums_name} lists no {image_name}; "
                   "check base_image.url and base_image.release")


def _verify_ubuntu_signature(session, url: str, sums: bytes, workdir: Path, *, retries: int,
                             backoff: float) -> str:
    """Check SHA256SUMS.gpg with gpgv when gpgv and the keyring exist."""
    keyring = next((k for k in UBUNTU_KEYRINGS if Path(k).is_file()), None)
    if shutil.which("gpgv") is None or keyring is None:
        extcmd.log.info("base-image: SHA256SUMS signature not checked (needs gpgv and %s)",
                        UBUNTU_KEYRINGS[0])
        return "not checked"
    resp = _get(session, url + "SHA256SUMS.gpg", "base-image", retries=retries, backoff=backoff)
    if resp.status_code != 200:
        raise LabError(f"base-image: {url}SHA256SUMS.gpg: HTTP {resp.status_code}; "
                       "the checksum file cannot be authenticated")
    (workdir / "SHA256SUMS").write_bytes(sums)
    (workdir / "SHA256SUMS.gpg").write_bytes(resp.content)
    extcmd.run(["gpgv", "--keyring", keyring, workdir / "SHA256SUMS.gpg", workdir / "SHA256SUMS"],
               what="base-image: verifying SHA256SUMS")
    return "good"


def part_path(dest: Path, expected: str) -> Path:
    """Where the download of ``dest`` with that published checksum accumulates."""
    return dest.with_name(f"{dest.name}.{expected[:12].lower()}.part")


def download(url: str, dest: Path, *, expected: str, algo: str, retries: int = RETRIES,
             backoff: float = BACKOFF, session=None, label: str | None = None) -> Path:
    """Download ``url`` to ``dest`` via a ``.part`` file, resuming, verified.

    The ``.part`` file survives an interrupted run; the next run asks the
    server for the rest (HTTP Range) and, if the server does not honour it,
    starts over.  It is named after the published checksum, so a part of an
    image the mirror has since replaced (Debian's ``latest``) is discarded
    instead of being completed into a mismatch.  Memory use is constant
    (1 MiB chunks).  A checksum mismatch deletes the download and raises.
    """
    import requests
    session = session or _session()
    part = part_path(dest, expected)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f"{dest.name}.*part"):
        if stale != part:
            stale.unlink(missing_ok=True)
    delay = backoff
    attempt = 0
    total: int | None = None
    with progress(label or f"downloading {dest.name}", None) as bar:
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with session.get(url, stream=True, timeout=TIMEOUT, headers=headers) as resp:
                    if resp.status_code == 416 and have:        # nothing left to fetch
                        break
                    if resp.status_code == 404:
                        raise LabError(f"base-image: {url}: HTTP 404; check base_image.url "
                                       "and base_image.release")
                    if resp.status_code >= 500:
                        raise requests.ConnectionError(f"HTTP {resp.status_code}")
                    if resp.status_code not in (200, 206):
                        raise LabError(f"base-image: {url}: HTTP {resp.status_code}")
                    if resp.status_code == 200 and have:
                        extcmd.log.info("%s: server ignored the range request; starting over",
                                        dest.name)
                        have = 0
                    length = int(resp.headers.get("Content-Length", 0)) or None
                    total = (have + length) if length else total
                    bar.total = total
                    bar.done = have
                    if bar._bar is not None:
                        bar._bar.update(bar._task, total=total, completed=have)
                    mode = "ab" if have else "wb"
                    with open(part, mode) as fh:
                        for chunk in resp.iter_content(CHUNK):
                            fh.write(chunk)
                            bar.advance(len(chunk))
                    got = part.stat().st_size
                    if total is not None and got < total:
                        raise requests.ConnectionError(f"connection closed at {got} of {total} bytes")
                    break
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                attempt += 1
                if attempt >= retries:
                    raise LabError(f"base-image: downloading {url} failed: {_explain(exc)} after "
                                   f"{retries} attempts; rerun to resume from "
                                   f"{part.stat().st_size if part.exists() else 0} bytes") from None
                extcmd.log.info("%s: %s; resuming in %.0fs", dest.name, _explain(exc), delay)
                time.sleep(delay)
                delay *= 2
    h = hashlib.new(algo)
    with open(part, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != expected.lower():
        part.unlink(missing_ok=True)
        raise LabError(f"base-image: {url}: {algo} checksum mismatch (got {h.hexdigest()[:16]}..., "
                       f"published {expected[:16]}...); the download was deleted, rerun to fetch "
                       "it again or check base_image.url")
    os.replace(part, dest)
    return dest


def _download(lab: Lab, ws: Workspace, rel: Release, target: Path) -> dict:
    url = _base_url(lab, rel)
    image_name, sums_name, algo = remote_names(rel)
    session = _session()
    bundle = dib.ca_bundle(lab)
    if bundle is not None and url.startswith("https:"):
        session.verify = str(bundle)
    expected, sums = fetch_checksum(session, url, sums_name, image_name, algo=algo,
                                    retries=RETRIES, backoff=BACKOFF)
    cache = ws.cache_dir("downloads", rel.name)
    signature = None
    if rel.distro == "ubuntu":
        signature = _verify_ubuntu_signature(session, url, sums, cache,
                                             retries=RETRIES, backoff=BACKOFF)
    cached = cache / image_name
    if cached.exists():                     # a verified download from an earlier run?
        cached.unlink()
    download(url + image_name, cached, expected=expected, algo=algo, session=session,
             label=f"base-image {rel.name}: {image_name}")
    # move the verified file into artifacts/ atomically
    with atomic_path(target) as tmp:
        try:
            os.replace(cached, tmp)
        except OSError:
            shutil.copyfile(cached, tmp)
            cached.unlink()
    meta = {"url": url + image_name, algo: expected}
    if signature:
        meta["signature"] = signature
    return meta
