"""Getting one file into Glance as an active, hash-verified image, or
leaving nothing behind.

* the local side: disk format, the artifact behind an ``--image`` argument,
  and ``HashingBody``, the request body that reads the file once and hashes
  it in the same pass (a reader thread, constant memory);
* ``cleanup_stuck``: images an earlier labforge run left ``queued``,
  ``saving``, ``uploading``, ``importing`` or ``killed``;
* ``reuse``: an active image with the same name and content;
* ``upload``: the state machine.  Create the image, send the data as a
  direct upload (``PUT /file``) or a ``glance-direct`` import (``PUT /stage``
  + import), ``auto`` falling back to the import when Glance refuses the
  direct upload; wait for ``active``; compare Glance's
  ``os_hash_algo``/``os_hash_value`` (``checksum``, md5, on a Glance too old
  for the former) with the local hash.  Any failure or interruption
  (Ctrl-C, SIGTERM: ``sigterm_as_interrupt``) deletes the image, retrying
  for a while when Glance does not answer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.fsutil import CHUNK
from builders.core.manifest import Manifest
from builders.core.workspace import Workspace
from builders.tools import qemu_img
from builders.tools.qemu_img import virtual_size  # noqa: F401 - part of this package's API

from .client import OWNER, SHA256, UPLOAD_ID, Cloud, first_line, glance_message, reason, \
    same_value

log = logging.getLogger("labforge")

DEFAULT_HASH = "sha512"             # Glance's default os_hash_algo
STUCK = ("queued", "saving", "uploading", "importing", "killed")
STALE_AFTER = 6 * 3600              # an unfinished upload from another host is dead after this
METHODS = ("auto", "direct", "glance-direct")
BUFFERS = 4                         # read-ahead chunks between the hashing reader and the sender
# a direct upload Glance (or a proxy in front of it) will not take: policy
# (403), method not allowed (405), a state it will not write in (409),
# media type (415), not implemented (501)
REFUSED = (403, 405, 409, 415, 501)
INTERRUPT_DELETE_TIMEOUT = 10.0     # one delete after Ctrl-C/SIGTERM: CI kills hard soon after
CLEANUP_WAIT = 30.0                 # how long a failed upload retries deleting its image

# qemu-img format -> Glance disk_format
_DISK_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vdi": "vdi",
                 "vhdx": "vhdx", "vpc": "vhd", "qed": "qcow2"}
GLANCE_DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi",
                       "iso", "ploop")


# --------------------------------------------------------------------------
# local file: format, size, streaming hash
# --------------------------------------------------------------------------
def detect_disk_format(path: Path) -> str:
    """Glance disk_format of a file (qemu-img's format, ``iso`` for ISO 9660)."""
    fmt = qemu_img.detect_format(path)
    return "iso" if fmt == "iso" else _DISK_FORMATS.get(fmt, "raw")


def file_hash(path: Path, algo: str, label: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False)
    size = path.stat().st_size
    with progress(label, size) as bar, open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            bar.advance(len(chunk))
    return h.hexdigest()


class HashingBody:
    """The request body: iterates over the file in CHUNK pieces, hashing each
    piece as it is read.  A reader thread reads and hashes up to BUFFERS
    chunks ahead (hashlib releases the GIL), so hashing overlaps sending and
    memory stays at a few MiB whatever the file size.  ``__len__`` gives
    requests the Content-Length (no chunked encoding)."""

    def __init__(self, path: Path, size: int, algos: Sequence[str], bar=None):
        self.path, self.size, self.bar = path, size, bar
        self.hashes = {a: hashlib.new(a) for a in algos}
        self.sent = 0
        self.bytes_read = 0
        self._q: queue.Queue = queue.Queue(maxsize=BUFFERS)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return self.size

    def _reader(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                try:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except (AttributeError, OSError):
                    pass
                while not self._stop.is_set():
                    chunk = fh.read(CHUNK)
                    if not chunk:
                        break
                    for h in self.hashes.values():
                        h.update(chunk)
                    self.bytes_read += len(chunk)
                    while not self._stop.is_set():
                        try:
                            self._q.put(chunk, timeout=0.2)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        finally:
            while not self._stop.is_set():
                try:
                    self._q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> Iterator[bytes]:
        self._thread = threading.Thread(target=self._reader, name="labforge-hash", daemon=True)
        self._thread.start()
        try:
            while True:
                chunk = self._q.get()
                if chunk is None:
                    break
                self.sent += len(chunk)
                if self.bar is not None:
                    self.bar.advance(len(chunk))
                yield chunk
            if self._error is not None:
                raise self._error
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def complete(self) -> bool:
        return self.sent == self.size and self.bytes_read == self.size

    def hexdigest(self, algo: str) -> str:
        return self.hashes[algo].hexdigest()


# --------------------------------------------------------------------------
# what to upload
# --------------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    size: int
    record: dict | None               # the manifest record when the file is an artifact
    manifest: Manifest

    @property
    def sha256(self) -> str | None:
        """The manifest's sha256, trusted when the file is intact (stat or re-hash)."""
        if self.record and self.manifest.intact(self.path, self.record):
            return self.record.get("sha256")
        return None

    def known_hash(self, algo: str) -> str | None:
        """A hash of this content recorded by an earlier upload (any cloud)."""
        if not self.sha256:
            return None
        for entry in ((self.record or {}).get("meta", {}).get("glance") or {}).values():
            if (isinstance(entry, dict) and entry.get("sha256") == self.sha256
                    and entry.get("os_hash_algo") == algo and entry.get("os_hash_value")):
                return entry["os_hash_value"]
        return None


def resolve_image(ws: Workspace, image: str, kinds: tuple[str, ...] = ()) -> Source:
    """An image argument: a file path, or a manifest name (``debian-12``).
    An artifact must match its manifest record (nothing changed it since)."""
    man = Manifest(ws.artifacts)
    p = Path(image).expanduser()
    if not p.exists() and "/" in image and not man.entries():
        raise LabError(f"{image}: no such file; give an image file or a name from {man.path}")
    path, rec = man.resolve(image, kinds)
    if p.is_file() and kinds and (rec is None or rec.get("kind") not in kinds):
        raise LabError(f"{image}: not a {' or '.join(kinds)} artifact in {man.path}; "
                       "build it first")
    src = Source(path, path.stat().st_size, rec, man)
    if src.record is not None and src.sha256 is None:
        raise LabError(f"{src.path}: differs from its record in {src.manifest.path} (changed "
                       "after it was built); rebuild it with --force before publishing")
    return src


def parse_properties(props: Mapping[str, Any] | Iterable[str] | None) -> dict[str, str]:
    """``--property KEY=VALUE`` arguments (or a mapping) as a dict of strings."""
    if props is None:
        return {}
    if isinstance(props, Mapping):
        return {str(k): str(v) for k, v in props.items()}
    out = {}
    for item in props:
        if "=" not in item:
            raise LabError(f"--property {item}: expected KEY=VALUE (e.g. --property os_distro=debian)")
        k, v = item.split("=", 1)
        if not k.strip():
            raise LabError(f"--property {item}: empty key; expected KEY=VALUE")
        out[k.strip()] = v
    return out


# --------------------------------------------------------------------------
# images an interrupted run left
# --------------------------------------------------------------------------
def _owner_mark() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(image: dict) -> float:
    stamp = image.get("updated_at") or image.get("created_at")
    try:
        t = _dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()


def owned(cl: Cloud, img: dict) -> bool:
    """The image belongs to the project we authenticated to."""
    return not cl.project_id or img.get("owner") == cl.project_id


def _mine(cl: Cloud) -> dict[str, str]:
    """List filter: the images of our project."""
    return {"owner": cl.project_id} if cl.project_id else {}


def cleanup_stuck(cl: Cloud, *, stale_after: float = STALE_AFTER) -> list[str]:
    """Delete images labforge created that never became active: ``killed``
    always; ``queued``/``saving``/``uploading``/``importing`` when the
    uploading process is gone (same host) or they have not moved for
    ``stale_after`` seconds (other hosts).  Returns the deleted ids."""
    host = socket.gethostname()
    gone = []
    for status in STUCK:
        for img in cl.images(status=status, **_mine(cl)):
            if UPLOAD_ID not in img:
                continue
            owner = str(img.get(OWNER, ""))
            o_host, _, o_pid = owner.rpartition(":")
            if status != "killed":
                if o_host == host and o_pid.isdigit():
                    if _pid_alive(int(o_pid)) and int(o_pid) != os.getpid():
                        continue
                elif _age(img) < stale_after:
                    continue
            log.info("glance: removing image %s (%s, %s) left by an interrupted labforge upload",
                     img["id"], img.get("name"), status)
            cl.delete_image(img["id"])
            gone.append(img["id"])
    return gone


# --------------------------------------------------------------------------
# reuse or upload
# --------------------------------------------------------------------------
@dataclass
class Result:
    image: dict
    reused: bool
    method: str
    seconds: float
    local_hash: str
    changes: list[str] = field(default_factory=list)
    note: str = ""                  # e.g. why the method differs from the one asked


def reuse(cl: Cloud, src: Source, name: str, tags: Sequence[str], props: Mapping[str, str],
          min_disk: int | None, min_ram: int | None, visibility: str) -> Result | None:
    """An active image of ours with this name and content, updated to carry
    ``tags`` and ``props``; None when there is none."""
    cands = [i for i in cl.images(name=name, status="active")
             if owned(cl, i) and i.get("size") == src.size and i.get("os_hash_value")]
    if not cands:
        return None
    algos = {i.get("os_hash_algo") or DEFAULT_HASH for i in cands}
    local = {}
    for algo in sorted(algos):
        if algo not in hashlib.algorithms_available:
            continue
        local[algo] = src.known_hash(algo) or file_hash(
            src.path, algo, f"hashing {src.path.name} ({algo}) to compare with Glance")
    match = [i for i in cands if local.get(i.get("os_hash_algo") or DEFAULT_HASH) == i["os_hash_value"]]
    if not match:
        return None
    img = sorted(match, key=lambda i: i.get("created_at", ""))[-1]
    changes = []
    for t in tags:
        if t not in img.get("tags", []):
            cl.add_tag(img["id"], t)
            changes.append(f"tag {t}")
    want: dict[str, Any] = dict(props)
    if src.sha256 and img.get(SHA256) != src.sha256:
        want[SHA256] = src.sha256
    update: dict[str, Any] = {}
    for k, v in want.items():
        if not same_value(img.get(k), v):
            update[k] = v
            changes.append(f"property {k}")
    for key, val in (("min_disk", min_disk), ("min_ram", min_ram)):
        if val is not None and img.get(key) != val:
            update[key] = int(val)
            changes.append(key)
    if img.get("visibility") != visibility:
        update["visibility"] = visibility
        changes.append(f"visibility {visibility}")
    if update:
        cl.update_image(img["id"], set_=update)
    log.info("glance: %s: an active image with the same name and content exists (%s); reusing it",
             name, img["id"])
    algo = img.get("os_hash_algo") or DEFAULT_HASH
    return Result(cl.get_image(img["id"]), True, "reuse", 0.0, local[algo], changes)


def upload(cl: Cloud, src: Source, *, attrs: Mapping[str, Any], method: str, timeout: float,
           cleanup_wait: float = CLEANUP_WAIT) -> Result:
    """Create the image (``attrs``: name, formats, tags, properties...) and
    send the data.  ``auto`` is a direct upload, as the openstack CLI does it
    (one write in Glance); when Glance refuses it (policy ``upload_image``, a
    proxy in front) the refused image is deleted and the file goes through
    the glance-direct import instead."""
    if method not in METHODS:
        raise LabError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method == "glance-direct" and "glance-direct" not in cl.import_methods():
        raise LabError(f"--method glance-direct: Glance at {cl.endpoint} does not offer it "
                       "(see /v2/info/import); use --method direct")
    # the hash Glance will compute: what its images report, sha512 by default
    algo = DEFAULT_HASH
    for img in cl.images(status="active", limit=5, **_mine(cl)):
        if img.get("os_hash_algo") and img["os_hash_algo"] in hashlib.algorithms_available:
            algo = img["os_hash_algo"]
            break
    once = dict(cl=cl, src=src, attrs=attrs, algo=algo, timeout=timeout,
                cleanup_wait=cleanup_wait)
    if method == "glance-direct":
        return _upload_once(method="glance-direct", **once)
    try:
        return _upload_once(method="direct", **once)
    except Refused as exc:
        refused = exc
    why = f"HTTP {refused.status}: {refused.detail}"
    offered = "glance-direct" in cl.import_methods()
    if method == "direct" or not offered:
        hint = ("use --method glance-direct (or auto)" if offered else
                "it offers no glance-direct import either (/v2/info/import): ask the cloud's "
                "admin to allow upload_image or to enable glance-direct")
        raise LabError(cl.err(
            f"glance: Glance at {cl.endpoint} refused the direct upload of {src.path} "
            f"({why}); image {refused.image_id} was deleted; {hint}"))
    log.info("glance: Glance refused the direct upload (%s); deleted image %s, uploading "
             "through the glance-direct import instead", why, refused.image_id)
    res = _upload_once(method="glance-direct", **once)
    res.note = f"direct upload refused (HTTP {refused.status})"
    return res


class Refused(Exception):
    """Glance answered the data request with one of REFUSED (image deleted)."""

    def __init__(self, status: int, detail: str, image_id: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.image_id = status, detail, image_id


def _upload_once(cl: Cloud, src: Source, *, attrs: Mapping[str, Any], method: str, algo: str,
                 timeout: float, cleanup_wait: float) -> Result:
    """One image: create, send, (import), verify.  The cleanup covers the
    create itself: whatever image this attempt made is deleted on any error
    or interruption, found by its ``labforge_upload_id`` when the create's
    answer never arrived."""
    upload_id = uuid.uuid4().hex
    image_id: str | None = None
    stream = None
    try:
        img = cl.create_image({**attrs, UPLOAD_ID: upload_id, OWNER: _owner_mark()})
        image_id = img["id"]
        log.info("glance: created image %s %r (%s, %s); uploading %s", image_id, attrs["name"],
                 attrs["disk_format"], method, src.path)
        algos = [algo]     # one hash only: a second one would cost throughput on small machines
        t0 = time.monotonic()
        with progress(f"upload {src.path.name}", src.size) as bar:
            stream = HashingBody(src.path, src.size, algos, bar)
            _send(cl, image_id, "file" if method == "direct" else "stage", stream,
                  what=f"upload {src.path.name} as image {image_id}")
        if not stream.complete:
            raise LabError(f"glance: upload of {src.path} stopped after {stream.sent} of "
                           f"{src.size} bytes; rerun")
        seconds = time.monotonic() - t0
        if method == "glance-direct":
            cl.import_image(img, "glance-direct")
        img = _wait_active(cl, image_id, timeout)
        local = _verify(img, src, stream.hexdigest(algo), algo)
        img = _drop_owner_mark(cl, img)
        return Result(img, False, method, seconds, local)
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        label = image_id or f"with {UPLOAD_ID}={upload_id}"
        with _signals_deferred(interrupted):
            if stream is not None:
                stream.close()
            stop: KeyboardInterrupt | None = None
            try:
                gone, why = _cleanup(cl, image_id, upload_id, interrupted=interrupted,
                                     wait=cleanup_wait)
            except KeyboardInterrupt as again:  # Ctrl-C/SIGTERM while retrying a failed upload's delete
                gone, why, stop = False, "interrupted", again
            if (interrupted or stop) and not gone:
                log.warning("glance: image %s could not be deleted (%s): the next labforge upload "
                            "to this cloud removes it", label, why)
        if stop is not None:
            raise stop from None
        if interrupted:
            raise
        if isinstance(exc, Refused) and gone and method == "direct":
            raise                       # upload() decides: glance-direct instead, or the error
        if isinstance(exc, Refused):
            msg = cl.err(f"glance: Glance at {cl.endpoint} refused the {method} "
                         f"upload of {src.path} ({exc})")
        elif isinstance(exc, LabError):
            msg = exc.message
        else:
            msg = cl.err(f"glance: upload of {src.path} as image {image_id} failed: "
                         f"{first_line(exc)}")
        if gone and image_id:
            msg += f"; image {image_id} was deleted"
        elif not gone:
            msg += (f"; image {label} could not be deleted ({why}): the next labforge upload "
                    "to this cloud removes it")
        raise LabError(msg) from None


def _verify(img: dict, src: Source, local: str, algo: str) -> str:
    """Glance's hash of what it stored against the local one (returned).
    ``os_hash_algo``/``os_hash_value`` (multihash); a Glance that reports
    only the legacy ``checksum`` gets an md5 of the file."""
    image_id = img["id"]
    server_algo, server_value = img.get("os_hash_algo"), img.get("os_hash_value")
    if not server_value and img.get("checksum"):
        server_algo, server_value = "md5", img["checksum"]
    if server_algo and server_algo != algo:
        local = file_hash(src.path, server_algo, f"hashing {src.path.name} ({server_algo})")
    if not server_value or server_value != local:
        raise LabError(f"glance: image {image_id}: Glance's {server_algo or algo} "
                       f"{str(server_value)[:16]}… differs from the local "
                       f"{local[:16]}… of {src.path}: the upload was corrupted; rerun")
    return local


def _send(cl: Cloud, image_id: str, target: str, stream: HashingBody, *, what: str) -> None:
    """PUT the data to ``/images/{id}/file`` or ``/stage``.  Raises Refused
    when Glance will not take it.  Glance checks its policy before reading
    the body and answers 403 at once; under uWSGI over TLS the connection
    then closes while the body is still being sent, so the client sees a
    lost connection (SSL EOF, reset), never the 403.  A lost connection while
    the image is still ``queued`` (Glance never started writing) is therefore
    asked again with an empty body, which gets the answer through."""
    from keystoneauth1 import exceptions as ka
    try:
        resp = cl.put_data(image_id, target, stream, size=stream.size)
    except (ka.ConnectFailure, ka.ConnectTimeout, ka.ConnectionError) as exc:
        lost = cl.unreachable(what, exc)
        try:
            status = cl.status_now(image_id, timeout=10)
        except LabError:
            raise lost from None
        if status != "queued":
            raise lost from None
        log.debug("glance: %s: connection lost while the image is still queued (%s); "
                  "asking Glance again with an empty body", what, reason(exc))
        try:
            resp = cl.put_data(image_id, target, b"", timeout=30)
        except ka.ClientException:
            raise lost from None
        if resp.status_code not in REFUSED:
            raise lost from None
    except ka.ClientException as exc:
        raise LabError(cl.err(f"glance: {what}: {first_line(exc)}")) from None
    if resp.status_code in REFUSED:
        raise Refused(resp.status_code, glance_message(resp), image_id)
    if resp.status_code not in (200, 201, 204):
        raise LabError(cl.err(f"glance: {what} failed: HTTP {resp.status_code}: "
                              f"{glance_message(resp)}"))


def _cleanup(cl: Cloud, image_id: str | None, upload_id: str, *, interrupted: bool,
             wait: float) -> tuple[bool, str]:
    """Delete what this attempt created: (gone, why not).  After an
    interruption one quick try; after a failure, retries for ``wait``
    seconds while Glance comes back (a restart, a load balancer failing
    over)."""
    deadline = time.monotonic() + (0 if interrupted else wait)
    per_try = INTERRUPT_DELETE_TIMEOUT if interrupted else 30.0
    why, told = "Glance unreachable", False
    while True:
        left = deadline - time.monotonic()
        try:
            timeout = max(min(per_try, left), INTERRUPT_DELETE_TIMEOUT)
            ids = [image_id] if image_id else cl.find_by_upload_id(upload_id, timeout)
            for iid in ids:
                cl.delete_now(iid, timeout)
            return True, ""
        except LabError as exc:
            why = "Glance unreachable" if "unreachable" in exc.message else _short(exc.message)
        except Exception as exc:  # noqa: BLE001 - best effort while failing already
            why = first_line(exc)[:120]
        if time.monotonic() + 1 >= deadline:
            if not interrupted:
                why += f" for {wait:.0f}s"
            return False, why
        if not told:
            log.info("glance: cannot delete image %s yet (%s); retrying for up to %.0fs",
                     image_id or upload_id, why, wait)
            told = True
        time.sleep(1)


def _short(message: str) -> str:
    return message.removeprefix("glance: ")[:160]


def _drop_owner_mark(cl: Cloud, img: dict) -> dict:
    """Remove the in-flight mark from an active image.  After an import,
    Glance's task may save its own (older) copy of the image a moment later
    and bring the property back, so check and repeat."""
    for attempt in range(10):
        if OWNER not in img:
            return img
        if attempt:
            time.sleep(0.5)
        try:
            cl.update_image(img["id"], remove=[OWNER])
        except LabError:
            pass            # already gone (409/400): re-read decides
        img = cl.get_image(img["id"])
    return img              # harmless: cleanup only ever touches images that are not active


def _wait_active(cl: Cloud, image_id: str, timeout: float) -> dict:
    """Wait for ``active`` and, after an import, for the import task to let
    go of the image (it holds ``os_glance_import_task`` until its last step,
    and may still save the image until then)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        img = cl.get_image(image_id)
        status = img.get("status")
        if status == "active" and not img.get("os_glance_import_task"):
            return img
        if status in ("killed", "deleted", "deactivated"):
            raise LabError(f"glance: image {image_id} went {status} instead of active: Glance "
                           "rejected the data (see its log)")
        if status == "queued" and img.get("os_glance_failed_import"):
            raise LabError(f"glance: image {image_id}: import failed in Glance "
                           f"(stores {img['os_glance_failed_import']}); see Glance's log")
        if time.monotonic() > deadline:
            if status == "active":
                return img
            raise LabError(f"glance: image {image_id} still {status} after {timeout:.0f}s; "
                           "check Glance's import tasks")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


# --------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _signals_deferred(active: bool = True):
    """Hold off SIGINT/SIGTERM while deleting an interrupted upload's image,
    so a second Ctrl-C or the CI runner's follow-up SIGTERM does not cut the
    delete short.  The run is ending with an interrupt already, so what
    arrives meanwhile is dropped.  (Handlers, not a signal mask: Python runs
    handlers in the main thread whichever thread the kernel picked.)"""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held = []
    for sig, prev in old.items():
        if prev is not None and prev is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, prev in old.items():
            if prev is not None and prev is not signal.SIG_IGN:
                signal.signal(sig, prev)
        if held:
            log.debug("glance: signal(s) %s arrived during the clean-up", held)


class Terminated(KeyboardInterrupt):
    """SIGTERM during an upload: unwinds like Ctrl-C, so the image is deleted."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM (a cancelled CI job) into Terminated, a KeyboardInterrupt,
    for the length of the block.  A SIGTERM handler somebody already set in
    Python (tasks.py's may turn it into KeyboardInterrupt itself) or an
    ignored SIGTERM is left alone; every cleanup here catches both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.getsignal(signal.SIGTERM)
    if prev is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)
