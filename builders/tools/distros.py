"""The distributions labforge builds for, one place per OS.

For each OS (:data:`DISTROS`): its releases (version and codename), the
releases with a published cloud image and where that image, its checksum
file and the checksum file's signature are, the diskimage-builder element
that makes a minimal root of it, and the default release of an amphora.
The mirrors builds use come from here too (:func:`debian_mirrors`,
:func:`ubuntu_mirror`): lab.yaml ``build.*`` first, else the machine's apt
sources, else the distribution's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from builders.core.lab import Lab


@dataclass(frozen=True)
class Release:
    distro: str
    version: str       # "12", "24.04"
    codename: str      # "bookworm", "noble"

    @property
    def name(self) -> str:
        """What images of this release are called: ``debian-12``, ``ubuntu-24.04``."""
        return f"{self.distro}-{self.version}"


@dataclass(frozen=True)
class Distro:
    name: str
    releases: dict[str, str]           # version -> codename, oldest first
    cloud_releases: tuple[str, ...]    # versions labforge downloads cloud images of
    cloud_url: str                     # directory of the image and its checksum file
    cloud_image: str                   # the image's file name there
    checksums: str                     # the checksum file's name ...
    checksum_algo: str                 # ... and its hash
    signature: str | None              # detached signature of the checksum file
    keyrings: tuple[str, ...]          # where the signing keys are on this machine
    dib_element: str                   # diskimage-builder's minimal root of this OS
    amphora_release: str               # codename an amphora defaults to

    def release(self, wanted: str, *, cloud: bool = False) -> Release | None:
        """The release named by version or codename (with ``cloud``: only one
        with a published cloud image); None when unknown."""
        wanted = str(wanted).strip().lower()
        for version, codename in self.known(cloud=cloud).items():
            if wanted in (version, codename):
                return Release(self.name, version, codename)
        return None

    def known(self, *, cloud: bool = False) -> dict[str, str]:
        return {v: c for v, c in self.releases.items() if not cloud or v in self.cloud_releases}

    def version(self, codename: str) -> str:
        """The version of a codename (``bookworm`` -> ``12``); the codename when unknown."""
        rel = self.release(codename)
        return rel.version if rel else codename

    def image_url(self, rel: Release) -> str:
        return self.cloud_url.format(codename=rel.codename, version=rel.version)

    def image_name(self, rel: Release) -> str:
        return self.cloud_image.format(codename=rel.codename, version=rel.version)


DEBIAN = Distro(
    name="debian",
    releases={"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"},
    cloud_releases=("11", "12", "13"),
    cloud_url="https://cloud.debian.org/images/cloud/{codename}/latest/",
    cloud_image="debian-{version}-genericcloud-amd64.qcow2",
    checksums="SHA512SUMS", checksum_algo="sha512",
    signature=None, keyrings=(),
    dib_element="debian-minimal",
    amphora_release="bookworm",
)
UBUNTU = Distro(
    name="ubuntu",
    releases={"20.04": "focal", "22.04": "jammy", "24.04": "noble", "25.04": "plucky"},
    cloud_releases=("20.04", "22.04", "24.04"),
    cloud_url="https://cloud-images.ubuntu.com/{codename}/current/",
    cloud_image="{codename}-server-cloudimg-amd64.img",
    checksums="SHA256SUMS", checksum_algo="sha256",
    signature="SHA256SUMS.gpg",
    keyrings=("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg",),
    dib_element="ubuntu-minimal",
    amphora_release="noble",
)
DISTROS = {d.name: d for d in (DEBIAN, UBUNTU)}

# CPU architecture names: Debian's -> the kernel's (Glance's `architecture`)
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}


def get(name: str) -> Distro:
    return DISTROS[name]


# --------------------------------------------------------------------------
# mirrors
# --------------------------------------------------------------------------
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def apt_sources(root: Path = Path("/")) -> list[tuple[str, list[str]]]:
    """(uri, suites) of every ``deb`` source of the machine's apt configuration."""
    out: list[tuple[str, list[str]]] = []
    listd = root / "etc/apt/sources.list.d"
    for f in sorted(listd.glob("*.sources")) if listd.is_dir() else []:
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                out.append((uri, fields.get("suites", "").split()))
    lists = [root / "etc/apt/sources.list"]
    lists += sorted(listd.glob("*.list")) if listd.is_dir() else []
    for f in lists:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb":
                out.append((parts[1], [parts[2]]))
    return out


def debian_mirrors(lab: Lab, root: Path = Path("/")) -> tuple[str, str]:
    """(main mirror, security mirror) for Debian builds.

    lab.yaml ``build.debian_mirror`` / ``build.debian_security_mirror`` win;
    else the machine's apt sources; else deb.debian.org.  A security mirror
    not given is the main mirror's ``-security`` sibling (the layout of
    deb.debian.org and most mirrors), never security.debian.org, which
    machines behind a proxy often cannot reach.
    """
    main = lab.build.debian_mirror
    sec = lab.build.debian_security_mirror
    sources = apt_sources(root)
    if main is None:
        for uri, suites in sources:
            if any(not s.endswith("-security") for s in suites) and "ubuntu" not in uri:
                main = uri
                break
    if sec is None:
        for uri, suites in sources:
            if any(s.endswith("-security") for s in suites) and "ubuntu" not in uri:
                sec = uri
                break
    main = (main or DEBIAN_MIRROR).rstrip("/")
    if sec is None:
        sec = main + "-security" if main.endswith("/debian") else DEBIAN_SECURITY_MIRROR
    return main, sec.rstrip("/")


def ubuntu_mirror(lab: Lab) -> str | None:
    """The Ubuntu mirror builds use (build.ubuntu_mirror); None: DIB's default."""
    return lab.build.ubuntu_mirror
