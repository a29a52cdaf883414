"""The two entry points: ``upload_image`` (``invoke glance-upload``) and
``publish_amphora`` (``invoke publish-amphora``, the pipeline's glance step),
with the amphora publishing policy (name, tag rotation, Octavia's image
properties).

``upload_image`` checks the options, connects, and under the workspace lock
removes images an interrupted run left, reuses an identical active image or
uploads (``upload``), rotates the tag (``rotation``) and records the image
in the artifact's manifest record (``meta["glance"][<cloud>]``).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from builders.core.contract import Publisher
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace
from builders.tools import distros, qemu_img

from .client import ROTATION, SHA256, Cloud, connect
from .rotation import rotate
from .upload import (CLEANUP_WAIT, GLANCE_DISK_FORMATS, METHODS, Result, Source, cleanup_stuck,
                     detect_disk_format, parse_properties, resolve_image, reuse, sigterm_as_interrupt,
                     upload)

VISIBILITIES = ("private", "shared", "community", "public")

# core image attributes: options of their own, not --property
_RESERVED = {"id", "name", "status", "checksum", "os_hash_algo", "os_hash_value", "size",
             "virtual_size", "created_at", "updated_at", "owner", "file", "schema", "self",
             "locations", "direct_url", "tags", "visibility", "disk_format", "container_format",
             "min_disk", "min_ram", "protected", "os_hidden", "stores"}

_ARCH = distros.ARCHES


def upload_image(lab: Lab, ws: Workspace, *, image: str, name: str | None = None,
                 tags: Sequence[str] = (), properties: Mapping[str, Any] | Iterable[str] | None = None,
                 visibility: str | None = None, cloud: str | None = None,
                 rotate_tag: str | None = None, keep: int | None = None,
                 deactivate_old: bool = False, method: str | None = None,
                 disk_format: str | None = None, min_disk: int | None = None,
                 min_ram: int | None = None, cacert: str | None = None,
                 insecure: bool = False, kinds: tuple[str, ...] = (),
                 timeout: float = 3600, cleanup_wait: float | None = None,
                 step: str = "glance-upload") -> list[Outcome]:
    """Upload one image to Glance (or reuse an identical one); see the package doc.
    ``cleanup_wait``: how long a failed upload keeps trying to delete its
    image while Glance does not answer (default CLEANUP_WAIT)."""
    t0 = time.monotonic()
    method = method or lab.glance.method
    if method not in METHODS:
        raise LabError(f"--method {method}: expected one of {', '.join(METHODS)}")
    visibility = visibility or lab.glance.visibility
    if visibility not in VISIBILITIES:
        raise LabError(f"--visibility {visibility}: expected one of {', '.join(VISIBILITIES)}")
    if keep is not None and keep < 1:
        raise LabError(f"--keep {keep}: keep at least 1 image (the new one)")
    if (keep is not None or deactivate_old) and not rotate_tag:
        raise LabError("--keep/--deactivate-old: they act on older images of a rotation; "
                       "add --rotate-tag TAG")
    if disk_format and disk_format not in GLANCE_DISK_FORMATS:
        raise LabError(f"--disk-format {disk_format}: expected one of {', '.join(GLANCE_DISK_FORMATS)}")
    props = parse_properties(properties)
    bad = sorted(set(props) & _RESERVED)
    if bad:
        raise LabError(f"--property {bad[0]}: a core image attribute, not a property; "
                       "use the matching option instead")
    for t in tags:
        if not t or len(t) > 255:
            raise LabError(f"--tag {t!r}: tags are 1 to 255 characters")
    src = resolve_image(ws, image, kinds)
    name = name or src.path.name.rsplit(".", 1)[0]
    fmt = disk_format or detect_disk_format(src.path)
    if fmt == "qcow2" and shutil.which("qemu-img"):
        # before contacting the cloud: a truncated image must not become a Glance image
        qemu_img.check(src.path, "rebuild it before uploading")
    all_tags = list(dict.fromkeys([*tags, *([rotate_tag] if rotate_tag else [])]))
    attrs: dict[str, Any] = {"name": name, "disk_format": fmt, "container_format": "bare",
                             "visibility": visibility, "tags": all_tags, **props}
    if src.sha256:
        attrs[SHA256] = src.sha256
    if rotate_tag:
        attrs[ROTATION] = rotate_tag
    if min_disk is not None:
        attrs["min_disk"] = int(min_disk)
    if min_ram is not None:
        attrs["min_ram"] = int(min_ram)
    cl = connect(cloud or lab.glance.cloud, cacert=cacert, insecure=insecure)
    try:
        with sigterm_as_interrupt(), BuildLock(ws):
            cleaned = cleanup_stuck(cl)
            res = reuse(cl, src, name, all_tags, props, min_disk, min_ram, visibility)
            if res is None:
                res = upload(cl, src, attrs=attrs, method=method, timeout=timeout,
                             cleanup_wait=CLEANUP_WAIT if cleanup_wait is None else cleanup_wait)
            rotated = rotate(cl, res.image, rotate_tag, keep, deactivate_old) if rotate_tag else []
            img = cl.get_image(res.image["id"])
            if src.record is not None:
                _record(src, cl, img, res)
    finally:
        cl.close()
    detail = [f"image {img['id']} {img['name']!r}",
              f"{img.get('os_hash_algo')} {str(img.get('os_hash_value'))[:16]}…"]
    if res.reused:
        detail.append("reused an identical active image" +
                      (f", added {', '.join(res.changes)}" if res.changes else ""))
    else:
        mib = src.size / (1 << 20)
        detail.append(f"{res.method} upload of {mib:.1f} MiB in {res.seconds:.1f}s "
                      f"({mib / max(res.seconds, 1e-6):.0f} MiB/s)"
                      + (f", {res.note}" if res.note else "") + ", hash verified")
    if img.get("tags"):
        detail.append("tags " + ",".join(sorted(img["tags"])))
    detail += rotated
    if cleaned:
        detail.append(f"removed {len(cleaned)} stuck image(s) of an interrupted run")
    if src.record is None:
        detail.append("not an artifact: manifest not updated")
    return [Outcome(f"{step} {cl.label}", "up to date" if res.reused else "built",
                    [src.path], "; ".join(detail), time.monotonic() - t0)]


def _record(src: Source, cl: Cloud, img: dict, res: Result) -> None:
    """The image in the artifact's record; left as it is (``uploaded`` too)
    when the image and what we know of it did not change."""
    rec = src.manifest.get(src.path) or {}
    glance = dict((rec.get("meta") or {}).get("glance") or {})
    entry = {
        "image_id": img["id"], "name": img.get("name"), "status": img.get("status"),
        "os_hash_algo": img.get("os_hash_algo"), "os_hash_value": img.get("os_hash_value"),
        "sha256": src.sha256 or img.get(SHA256), "tags": sorted(img.get("tags", [])),
        "visibility": img.get("visibility"), "disk_format": img.get("disk_format"),
        "auth_url": cl.auth_url, "project_id": cl.project_id, "endpoint": cl.endpoint,
        "uploaded": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "reused": res.reused,
    }
    old = glance.get(cl.label)
    if res.reused and isinstance(old, dict) and _same_entry(old, entry):
        return
    glance[cl.label] = entry
    src.manifest.update_meta(src.path, glance=glance)


def _same_entry(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """The same image with the same facts: when and how it got there aside."""
    volatile = ("uploaded", "reused")
    return ({k: v for k, v in old.items() if k not in volatile}
            == {k: v for k, v in new.items() if k not in volatile})


# --------------------------------------------------------------------------
# the amphora
# --------------------------------------------------------------------------
def amphora_properties(lab: Lab) -> dict[str, str]:
    """Properties Octavia deployments give the amphora image (devstack's
    plugin sets hw_architecture and hw_rng_model; os_distro/os_version as
    in Glance's common image properties)."""
    amp = lab.octavia.amphora
    release = amp.release
    version = distros.get(amp.base_os).version(release)
    return {"hw_architecture": _ARCH.get(amp.arch, amp.arch), "hw_rng_model": "virtio",
            "os_distro": amp.base_os, "os_version": version}


def find_amphora(lab: Lab, ws: Workspace) -> str:
    """The manifest path of the amphora artifact to publish."""
    man = Manifest(ws.artifacts)
    amps = sorted(rel for rel, rec in man.entries().items() if rec.get("kind") == "amphora")
    if not amps:
        raise LabError(f"amphora: no amphora image in {man.path}: run `invoke build-amphora` first")
    if len(amps) > 1:
        named = [r for r in amps if Path(r).name.startswith(lab.octavia.image_name + ".")]
        if len(named) == 1:
            return named[0]
        raise LabError(f"amphora: several amphora images in {man.path} ({', '.join(amps)}); "
                       "use `invoke glance-upload --image PATH --rotate-tag ...`")
    return amps[0]


def publish_amphora(lab: Lab, ws: Workspace, *, cloud: str | None = None,
                    properties: Iterable[str] | Mapping[str, Any] | None = None,
                    keep: int | None = None, deactivate_old: bool | None = None,
                    method: str | None = None, min_ram: int = 1024, cacert: str | None = None,
                    insecure: bool = False, visibility: str | None = None) -> list[Outcome]:
    """Upload the amphora artifact as ``octavia.image_name`` tagged
    ``octavia.amp_image_tag`` (rotated), with Octavia's image properties."""
    if not lab.octavia.enabled:
        return [Outcome("publish-amphora", "skipped", detail="octavia.enabled is false in lab.yaml")]
    rel = find_amphora(lab, ws)
    props = {**amphora_properties(lab), **parse_properties(properties)}
    return upload_image(
        lab, ws, image=str(ws.artifacts / rel), name=lab.octavia.image_name,
        properties=props, visibility=visibility, cloud=cloud,
        rotate_tag=lab.octavia.amp_image_tag,
        keep=keep if keep is not None else lab.glance.keep,
        deactivate_old=lab.glance.deactivate_old if deactivate_old is None else deactivate_old,
        method=method, min_disk=lab.octavia.amphora.size, min_ram=min_ram, cacert=cacert,
        insecure=insecure, kinds=("amphora",), step="publish-amphora")


class AmphoraPublisher(Publisher):
    """The pipeline's glance step: the amphora to Glance as Octavia finds it."""

    name = "glance"
    help = "publish the amphora to Glance, tagged"
    needs = ("amphora",)

    def skip_reason(self, lab: Lab, ws: Workspace) -> str | None:
        if lab.glance.cloud or os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL"):
            return None
        return "no cloud configured (set glance.cloud in lab.yaml, OS_CLOUD or OS_AUTH_URL)"

    def publish(self, lab: Lab, ws: Workspace, **options) -> list[Outcome]:
        result = publish_amphora(lab, ws, **options)
        return list(result) if isinstance(result, (list, tuple)) else [result]


GLANCE = AmphoraPublisher()
