"""Publish images to OpenStack Glance: authenticated, streamed, hash-verified.

``upload_image`` is what ``invoke glance-upload`` runs and ``publish_amphora``
what ``invoke publish-amphora`` runs.  The flow:

1. authenticate the OpenStack way (openstacksdk's config loader: clouds.yaml
   via ``--cloud``/``OS_CLOUD``, or ``OS_*`` variables; Keystone v3 password
   or application credential; CA bundle / insecure as the openstack CLI has
   them) and find the image endpoint in the service catalog;
2. remove images an earlier labforge run left stuck (``queued``, ``saving``,
   ``uploading``, ``importing``, ``killed``; marked with
   ``labforge_upload_id``) when the process that made them is gone;
3. reuse an active image of the same name and content (``os_hash_value``),
   adding the missing tags and properties;
4. otherwise create the image, stream the file (constant memory, one read,
   hashed in the same pass by a reader thread) with a direct upload (as the
   openstack CLI does; ``auto``) or the interoperable ``glance-direct``
   import (asked for, or when Glance refuses the direct upload), wait for
   ``active``, compare Glance's ``os_hash_algo``/``os_hash_value`` with the
   local hash.  Any failure or interruption (Ctrl-C, SIGTERM) deletes the
   image, retrying for a while when Glance does not answer;
5. rotate a tag (``--rotate-tag``): only the new image keeps it; older images
   of the same rotation are kept, deactivated or deleted beyond ``keep``;
6. record image id, hash and tags in the manifest record's
   ``meta["glance"][<cloud>]``.

All HTTP goes through the SDK's keystoneauth session (``conn.image``, an
adapter bound to the catalog's image endpoint), so tokens, TLS settings and
the endpoint are the SDK's.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import shutil
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
from builders.core.lab import Lab
from builders.core.manifest import Manifest
from builders.core.outcome import Outcome
from builders.core.extcmd import mask, run
from builders.core.workspace import BuildLock, Workspace

log = logging.getLogger("labforge")

DEFAULT_HASH = "sha512"             # Glance's default os_hash_algo
STUCK = ("queued", "saving", "uploading", "importing", "killed")
STALE_AFTER = 6 * 3600              # an unfinished upload from another host is dead after this
UPLOAD_ID = "labforge_upload_id"    # every image labforge creates carries these
OWNER = "labforge_owner"            # host:pid of the uploading process
SHA256 = "labforge_sha256"          # the file's sha256 (the manifest's hash)
ROTATION = "labforge_rotation"      # the tag this image rotates with
METHODS = ("auto", "direct", "glance-direct")
VISIBILITIES = ("private", "shared", "community", "public")
BUFFERS = 4                         # read-ahead chunks between the hashing reader and the sender

# qemu-img format -> Glance disk_format
_DISK_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vdi": "vdi",
                 "vhdx": "vhdx", "vpc": "vhd", "qed": "qcow2"}
GLANCE_DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi",
                       "iso", "ploop")

_DEBIAN = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}
_UBUNTU = {"focal": "20.04", "jammy": "22.04", "noble": "24.04", "plucky": "25.04"}
_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


# --------------------------------------------------------------------------
# connecting
# --------------------------------------------------------------------------
@dataclass
class Cloud:
    """An authenticated connection and what we know about it."""
    conn: Any
    label: str                      # clouds.yaml name, or "envvars" for OS_*
    auth_url: str
    project_id: str
    endpoint: str                   # the image endpoint (versioned)
    secrets: tuple[str, ...] = ()

    def err(self, text: str) -> str:
        return mask(text, self.secrets)


def _kaexc():
    from keystoneauth1 import exceptions
    return exceptions


DEFAULT_TIMEOUT = 60.0      # seconds: connect, and each wait for an answer


def _clouds_files() -> list[Path]:
    """The clouds.yaml / secure.yaml files the SDK would read (the first of
    its search path that exists, of each kind)."""
    from openstack.config import loader
    out = []
    for env, paths in (("OS_CLIENT_CONFIG_FILE", loader.CONFIG_FILES),
                       ("OS_CLIENT_SECURE_FILE", loader.SECURE_FILES)):
        for f in [os.environ.get(env), *paths]:
            if f and os.path.exists(f):
                out.append(Path(f))
                break
    return out


def _check_clouds_yaml(path: Path) -> None:
    """A clouds.yaml the SDK would silently skip (bad YAML, not a mapping of
    clouds) is an error naming the file, not 'cloud not found'."""
    import yaml
    from builders.core.fsutil import read_regular
    try:
        data = yaml.safe_load(read_regular(path, "clouds.yaml", 1 << 20))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LabError(f"glance: {path}{line}: invalid YAML "
                       f"({getattr(exc, 'problem', None) or 'syntax error'}); fix the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabError(f"glance: {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if data is None:
        return
    if not isinstance(data, dict) or not isinstance(data.get("clouds", {}), dict):
        raise LabError(f"glance: {path}: expected 'clouds:' with a mapping of cloud names; "
                       "see the openstack client's clouds.yaml documentation")
    for name, entry in (data.get("clouds") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("auth", {}), dict):
            raise LabError(f"glance: {path}: clouds.{name}: expected a mapping with an 'auth' "
                           "mapping (auth_url, username, password, project_name, ...)")


def _check_auth(auth: dict, auth_type: str, where: str) -> None:
    """The credentials keystoneauth needs, before it is asked (it raises a
    bare Exception for some of them)."""
    if auth_type in ("password", "v3password", "v2password") or not auth_type:
        missing = [k for k in ("password",) if not auth.get(k)]
        if not (auth.get("username") or auth.get("user_id")):
            missing.insert(0, "username")
        if missing:
            env = " and ".join(f"OS_{k.upper()}" for k in missing)
            fix = f"set {env}" if where.startswith("the OS_") else \
                f"add {' and '.join(missing)} under its auth (or set {env})"
            raise LabError(f"glance: {where}: no {' and no '.join(missing)}; {fix}")
    elif auth_type == "v3applicationcredential":
        if not auth.get("application_credential_secret"):
            raise LabError(f"glance: {where}: no application_credential_secret; add it under auth")


def connect(cloud: str | None = None, *, cacert: str | None = None,
            insecure: bool | None = None, timeout: float | None = None) -> Cloud:
    """Authenticate and find the image endpoint; every failure is one LabError line.

    Every request has a connect and a read timeout (``timeout`` seconds each,
    lab.yaml glance.timeout; a clouds.yaml ``api_timeout`` wins): a Keystone
    or Glance that accepts a connection and never answers ends in one line."""
    import openstack.config
    import openstack.connection
    from openstack import exceptions as osexc
    ka = _kaexc()

    kwargs: dict[str, Any] = {}
    if cacert:
        if not Path(cacert).is_file():
            raise LabError(f"--os-cacert {cacert}: no such file; give the CA bundle that signed "
                           "Keystone's and Glance's certificates")
        kwargs["cacert"] = str(cacert)
    if insecure:
        kwargs["verify"] = False
    # the SDK's and keystoneauth's own warnings would print beside our one-line error
    for name in ("keystoneauth", "openstack", "urllib3"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
            lg.addHandler(logging.NullHandler())
    where = (f"clouds.yaml cloud {cloud!r}" if cloud else
             f"clouds.yaml cloud {os.environ['OS_CLOUD']!r} (OS_CLOUD)" if os.environ.get("OS_CLOUD")
             else "the OS_* environment variables")
    how = ("pass --cloud NAME with a clouds.yaml entry, set OS_CLOUD, or source an openrc "
           "(OS_AUTH_URL, ...)")
    files = _clouds_files()
    for f in files:
        _check_clouds_yaml(f)
    if not cloud and not os.environ.get("OS_CLOUD") and not os.environ.get("OS_AUTH_URL"):
        raise LabError(f"glance: no cloud configured; {how}")
    try:
        config = openstack.config.OpenStackConfig(load_yaml_config=True, load_envvars=True)
    except osexc.ConfigException as exc:
        raise LabError(f"glance: {where}: {_first_line(exc)}; {how}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # the SDK on odd files
        raise LabError(f"glance: {', '.join(map(str, files)) or where}: the OpenStack SDK cannot "
                       f"read it ({type(exc).__name__}: {_first_line(exc)}); fix the file") from None
    try:
        region = config.get_one(cloud=cloud, **kwargs)
    except osexc.ConfigException as exc:
        raise LabError(f"glance: {where}: {_first_line(exc)}; {how}") from None
    except (ka.MissingRequiredOptions, ka.AuthPluginException, ka.NoMatchingPlugin) as exc:
        missing = " ".join(o.dest for o in getattr(exc, "options", []) or [])
        raise LabError(f"glance: {where}: incomplete credentials"
                       f"{f' (no {missing})' if missing else ''}; {how}") from None
    if not region.config.get("api_timeout"):
        region.config["api_timeout"] = float(timeout or DEFAULT_TIMEOUT)
    auth = dict(region.config.get("auth") or {})
    secrets = tuple(str(auth[k]) for k in ("password", "application_credential_secret", "token")
                    if auth.get(k))
    auth_url = str(auth.get("auth_url") or "")
    if not auth_url:
        raise LabError(f"glance: {where}: no auth_url; {how}")
    _check_auth(auth, str(region.config.get("auth_type") or ""), where)
    who = (f"application credential {auth.get('application_credential_id') or auth.get('application_credential_name')}"
           if region.config.get("auth_type") == "v3applicationcredential"
           else f"user {auth.get('username') or auth.get('user_id') or '?'}")

    def fail(text: str) -> LabError:
        return LabError(mask(text, secrets))

    try:
        conn = openstack.connection.Connection(config=region)
        conn.session.get_token()
        project_id = conn.current_project_id
        endpoint = _image_endpoint(conn, auth_url, where, secrets)
    except ka.Unauthorized:
        raise fail(f"glance: Keystone {auth_url} refused {who} (HTTP 401): check the password or "
                   f"application credential secret in {where}") from None
    except ka.SSLError:
        raise fail(f"glance: TLS verification of {auth_url} failed: pass --os-cacert FILE "
                   f"(or cacert in {where}), or --insecure for a lab") from None
    except (ka.ConnectTimeout, ka.RequestTimeout):
        raise fail(f"glance: Keystone at {auth_url} did not answer within "
                   f"{float(region.config['api_timeout']):.0f}s: check auth_url in {where} and that "
                   "Keystone runs (glance.timeout in lab.yaml sets the wait)") from None
    except ka.ConnectFailure as exc:
        raise fail(f"glance: cannot reach Keystone at {auth_url} ({_reason(exc)}): check "
                   f"auth_url in {where} and that Keystone runs") from None
    except ka.EndpointNotFound:
        raise fail(f"glance: no image service (Glance) in the catalog of {auth_url} for "
                   f"region {region.region_name or '-'}: check region_name/interface in {where}") from None
    except (ka.MissingRequiredOptions, ka.AuthPluginException, ka.NoMatchingPlugin) as exc:
        raise fail(f"glance: {where}: incomplete credentials ({_first_line(exc)}): set "
                   "username/password/project or an application credential") from None
    except (ka.ClientException, osexc.SDKException) as exc:
        raise fail(f"glance: authentication at {auth_url} failed: {_first_line(exc)}; check "
                   f"that auth_url in {where} is Keystone's identity URL "
                   "(https://HOST:5000/v3)") from None
    if not endpoint:
        raise fail(f"glance: no image endpoint in the catalog of {auth_url}: check {where}")
    return Cloud(conn=conn, label=region.name or "envvars", auth_url=auth_url,
                 project_id=project_id or "", endpoint=endpoint.rstrip("/"), secrets=secrets)


def _image_endpoint(conn, auth_url: str, where: str, secrets: tuple[str, ...]) -> str:
    """The versioned image endpoint (catalog lookup + version discovery)."""
    from openstack import exceptions as osexc
    ka = _kaexc()
    try:
        catalog_url = conn.session.get_endpoint(service_type="image", interface=conn.config.get_interface(),
                                                region_name=conn.config.get_region_name("image"),
                                                skip_discovery=True)
    except ka.EndpointNotFound:
        raise
    override = conn.config.get_endpoint("image")
    source = (f"image_endpoint_override in {where}" if override
              else f"image endpoint in the catalog of {auth_url}")
    try:
        return conn.image.get_endpoint()
    except (ka.ConnectFailure, ka.ConnectTimeout, ka.DiscoveryFailure, osexc.SDKException,
            ka.ClientException) as exc:
        raise LabError(mask(f"glance: Glance at {override or catalog_url} ({source}) does not "
                            f"answer ({_reason(exc)}): check that it runs and rerun",
                            secrets)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    text = _first_line(exc)
    for marker in ("Connection refused", "Connection reset", "Name or service not known",
                   "timed out", "Remote end closed", "Broken pipe"):
        if marker.lower() in str(exc).lower():
            return marker.lower()
    return text[:160]


# --------------------------------------------------------------------------
# Glance REST through the SDK's session
# --------------------------------------------------------------------------
class Api:
    """Thin calls on the image adapter; HTTP errors become LabErrors."""

    def __init__(self, cloud: Cloud):
        self.cloud = cloud
        self.image = cloud.conn.image

    def call(self, method: str, path: str, *, ok: Sequence[int] = (200, 201, 202, 204),
             what: str = "", retries: int = 0, **kw):
        """One request; ``retries`` repeats an idempotent metadata change that
        met a conflict or a server error (an import task finishing can hold
        the image row for a moment)."""
        for attempt in range(retries + 1):
            resp = self._call(method, path, what=what, **kw)
            if resp.status_code in ok or resp.status_code not in (409, 500, 503) \
                    or attempt == retries:
                break
            time.sleep(0.5 * (attempt + 1))
        if resp.status_code not in ok:
            raise LabError(self.cloud.err(
                f"glance: {what or method + ' ' + path} failed: HTTP {resp.status_code}: "
                f"{_glance_message(resp)}"))
        return resp

    def _call(self, method: str, path: str, *, what: str = "", **kw):
        ka = _kaexc()
        kw.setdefault("raise_exc", False)
        try:
            return self.image.request(path, method, **kw)
        except (ka.ConnectFailure, ka.ConnectTimeout, ka.ConnectionError) as exc:
            raise LabError(self.cloud.err(
                f"glance: {what or method + ' ' + path}: Glance at {self.cloud.endpoint} is "
                f"unreachable ({_reason(exc)}): check that it runs and rerun")) from None
        except ka.ClientException as exc:
            raise LabError(self.cloud.err(
                f"glance: {what or method + ' ' + path}: {_first_line(exc)}")) from None

    def get_image(self, image_id: str) -> dict:
        return self.call("GET", f"/images/{image_id}", what=f"read image {image_id}",
                         retries=2).json()

    def list_images(self, *, first_page: bool = False, **filters: str) -> list[dict]:
        """Images matching Glance's list filters (all pages unless ``first_page``)."""
        out: list[dict] = []
        params = {"limit": "200", **filters}
        path = "/images"
        while True:
            data = self.call("GET", path, params=params, what="list images", retries=2).json()
            out += data.get("images", [])
            nxt = data.get("next")
            if not nxt or first_page:
                return out
            # "next" is /v2/images?marker=...; keep the filters, take the marker
            from urllib.parse import parse_qs, urlparse
            q = parse_qs(urlparse(nxt).query)
            params = {k: v[-1] for k, v in q.items()}

    def delete(self, image_id: str, *, timeout: float | None = None) -> None:
        self.call("DELETE", f"/images/{image_id}", ok=(204, 404), what=f"delete image {image_id}",
                  connect_retries=0, **({"timeout": timeout} if timeout else {}))

    def add_tag(self, image_id: str, tag: str) -> None:
        self.call("PUT", f"/images/{image_id}/tags/{_q(tag)}", what=f"tag image {image_id}",
                  retries=4)

    def remove_tag(self, image_id: str, tag: str) -> None:
        self.call("DELETE", f"/images/{image_id}/tags/{_q(tag)}", ok=(204, 404),
                  what=f"untag image {image_id}", retries=4)

    def patch(self, image_id: str, ops: list[dict]) -> dict:
        return self.call(
            "PATCH", f"/images/{image_id}", data=json.dumps(ops),
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
            what=f"update image {image_id}", retries=4).json()

    def import_methods(self) -> list[str]:
        resp = self.call("GET", "/info/import", ok=(200, 404), what="discover import methods")
        if resp.status_code != 200:
            return []
        return list((resp.json().get("import-methods") or {}).get("value") or [])


def _q(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


def _glance_message(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict):
            for key in ("message", "title"):
                if body.get(key):
                    return str(body[key]).splitlines()[0][:300]
            err = body.get("error") or body.get("badRequest") or {}
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])[:300]
    except ValueError:
        pass
    import re
    # webob's error page repeats the status in <title> and <h1>: keep the explanation
    text = re.sub(r"(?is)<(head|h1)>.*?</\1>", " ", resp.text or "")
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:300] or resp.reason or "no details"


# --------------------------------------------------------------------------
# local file: format, size, streaming hash
# --------------------------------------------------------------------------
def detect_disk_format(path: Path) -> str:
    """Glance disk_format of a file: qemu-img's answer when it is installed,
    magic bytes otherwise; an ISO 9660 file (qemu-img says raw) is ``iso``."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        fh.seek(0x8001)
        iso = fh.read(5) == b"CD001"
    if iso:
        return "iso"
    if shutil.which("qemu-img"):
        proc = run(["qemu-img", "info", "--output=json", str(path)], what="qemu-img info")
        fmt = json.loads(proc.stdout).get("format", "raw")
        return _DISK_FORMATS.get(fmt, "raw")
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV"):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    return "raw"


def virtual_size(path: Path) -> int | None:
    """Virtual disk size in bytes (qemu-img), None when unknown."""
    if not shutil.which("qemu-img"):
        return None
    proc = run(["qemu-img", "info", "--output=json", str(path)], what="qemu-img info")
    return json.loads(proc.stdout).get("virtual-size")


def file_hash(path: Path, algo: str, label: str) -> str:
    h = hashlib.new(algo)
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
# the upload
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
    src = _resolve_image(ws, image, kinds)
    if src.record is not None and src.sha256 is None:
        raise LabError(f"{src.path}: differs from its record in {src.manifest.path} (changed "
                       "after it was built); rebuild it with --force before publishing")
    return src


def _resolve_image(ws: Workspace, image: str, kinds: tuple[str, ...] = ()) -> Source:
    man = Manifest(ws.artifacts)
    p = Path(image).expanduser()
    if not p.exists() and "/" in image and not man.entries():
        raise LabError(f"{image}: no such file; give an image file or a name from {man.path}")
    path, rec = man.resolve(image, kinds)
    if p.is_file() and kinds and (rec is None or rec.get("kind") not in kinds):
        raise LabError(f"{image}: not a {' or '.join(kinds)} artifact in {man.path}; "
                       "build it first")
    return Source(path, path.stat().st_size, rec, man)


def _parse_properties(props: Mapping[str, Any] | Iterable[str] | None) -> dict[str, str]:
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


_RESERVED = {"id", "name", "status", "checksum", "os_hash_algo", "os_hash_value", "size",
             "virtual_size", "created_at", "updated_at", "owner", "file", "schema", "self",
             "locations", "direct_url", "tags", "visibility", "disk_format", "container_format",
             "min_disk", "min_ram", "protected", "os_hidden", "stores"}


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


def cleanup_stuck(api: Api, *, stale_after: float = STALE_AFTER) -> list[str]:
    """Delete images labforge created that never became active: ``killed``
    always; ``queued``/``saving``/``uploading``/``importing`` when the
    uploading process is gone (same host) or they have not moved for
    ``stale_after`` seconds (other hosts).  Returns the deleted ids."""
    host = socket.gethostname()
    gone = []
    for status in STUCK:
        for img in api.list_images(status=status, owner=api.cloud.project_id):
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
            api.delete(img["id"])
            gone.append(img["id"])
    return gone


@dataclass
class Result:
    image: dict
    reused: bool
    method: str
    seconds: float
    local_hash: str
    changes: list[str] = field(default_factory=list)
    note: str = ""                  # e.g. why the method differs from the one asked


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
    """Upload one image to Glance (or reuse an identical one); see the module doc.
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
    props = _parse_properties(properties)
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
        from builders.artifacts.baseimage import qemu_check
        qemu_check(src.path, "rebuild it before uploading")
    all_tags = list(dict.fromkeys([*tags, *([rotate_tag] if rotate_tag else [])]))
    cl = connect(cloud or lab.glance.cloud, cacert=cacert, insecure=insecure,
                 timeout=lab.glance.timeout)
    api = Api(cl)
    try:
        with sigterm_as_interrupt(), BuildLock(ws):
            cleaned = cleanup_stuck(api)
            res = _reuse(api, src, name, all_tags, props, min_disk, min_ram, visibility)
            if res is None:
                res = _upload(api, src, name=name, disk_format=fmt, visibility=visibility,
                              tags=all_tags, props=props, rotate_tag=rotate_tag, min_disk=min_disk,
                              min_ram=min_ram, method=method, timeout=timeout,
                              cleanup_wait=CLEANUP_WAIT if cleanup_wait is None else cleanup_wait)
            rotated = _rotate(api, res.image, rotate_tag, keep, deactivate_old) if rotate_tag else []
            img = api.get_image(res.image["id"])
            if src.record is not None:
                _record(src, cl, img, res)
    finally:
        cl.conn.close()
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


def _owned(api: Api, img: dict) -> bool:
    return not api.cloud.project_id or img.get("owner") == api.cloud.project_id


def _reuse(api: Api, src: Source, name: str, tags: Sequence[str], props: Mapping[str, str],
           min_disk: int | None, min_ram: int | None, visibility: str) -> Result | None:
    """An active image of ours with this name and content, updated to carry
    ``tags`` and ``props``; None when there is none."""
    cands = [i for i in api.list_images(name=name, status="active")
             if _owned(api, i) and i.get("size") == src.size and i.get("os_hash_value")]
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
            api.add_tag(img["id"], t)
            changes.append(f"tag {t}")
    ops = []
    want = dict(props)
    if src.sha256 and img.get(SHA256) != src.sha256:
        want[SHA256] = src.sha256
    for k, v in want.items():
        if img.get(k) != v:
            ops.append({"op": "replace" if k in img else "add", "path": f"/{k}", "value": v})
            changes.append(f"property {k}")
    for key, val in (("min_disk", min_disk), ("min_ram", min_ram)):
        if val is not None and img.get(key) != val:
            ops.append({"op": "replace", "path": f"/{key}", "value": int(val)})
            changes.append(key)
    if img.get("visibility") != visibility:
        ops.append({"op": "replace", "path": "/visibility", "value": visibility})
        changes.append(f"visibility {visibility}")
    if ops:
        api.patch(img["id"], ops)
    log.info("glance: %s: an active image with the same name and content exists (%s); reusing it",
             name, img["id"])
    algo = img.get("os_hash_algo") or DEFAULT_HASH
    return Result(api.get_image(img["id"]), True, "reuse", 0.0, local[algo], changes)


def _upload(api: Api, src: Source, *, name: str, disk_format: str, visibility: str,
            tags: Sequence[str], props: Mapping[str, str], rotate_tag: str | None,
            min_disk: int | None, min_ram: int | None, method: str, timeout: float,
            cleanup_wait: float) -> Result:
    """Create the image and send the data.  ``auto`` is a direct upload, as
    the openstack CLI does it (one write in Glance); when Glance refuses it
    (policy ``upload_image``, a proxy in front) the refused image is deleted
    and the file goes through the glance-direct import instead."""
    if method == "glance-direct" and "glance-direct" not in api.import_methods():
        raise LabError(f"--method glance-direct: Glance at {api.cloud.endpoint} does not offer it "
                       "(see /v2/info/import); use --method direct")
    # the hash Glance will compute: what its images report, sha512 by default
    algo = DEFAULT_HASH
    for img in api.list_images(owner=api.cloud.project_id, status="active", limit="5",
                               first_page=True):
        if img.get("os_hash_algo") and img["os_hash_algo"] in hashlib.algorithms_available:
            algo = img["os_hash_algo"]
            break
    body = {"name": name, "disk_format": disk_format, "container_format": "bare",
            "visibility": visibility, "tags": list(tags), **props}
    if src.sha256:
        body[SHA256] = src.sha256
    if rotate_tag:
        body[ROTATION] = rotate_tag
    if min_disk is not None:
        body["min_disk"] = int(min_disk)
    if min_ram is not None:
        body["min_ram"] = int(min_ram)
    once = dict(api=api, src=src, body=body, algo=algo, timeout=timeout,
                cleanup_wait=cleanup_wait)
    if method == "glance-direct":
        return _upload_once(method="glance-direct", **once)
    try:
        return _upload_once(method="direct", **once)
    except _Refused as exc:
        refused = exc
    why = f"HTTP {refused.status}: {refused.detail}"
    offered = "glance-direct" in api.import_methods()
    if method == "direct" or not offered:
        hint = ("use --method glance-direct (or auto)" if offered else
                "it offers no glance-direct import either (/v2/info/import): ask the cloud's "
                "admin to allow upload_image or to enable glance-direct")
        raise LabError(api.cloud.err(
            f"glance: Glance at {api.cloud.endpoint} refused the direct upload of {src.path} "
            f"({why}); image {refused.image_id} was deleted; {hint}"))
    log.info("glance: Glance refused the direct upload (%s); deleted image %s, uploading "
             "through the glance-direct import instead", why, refused.image_id)
    res = _upload_once(method="glance-direct", **once)
    res.note = f"direct upload refused (HTTP {refused.status})"
    return res


# a direct upload Glance (or a proxy in front of it) will not take: policy
# (403), method not allowed (405), a state it will not write in (409),
# media type (415), not implemented (501)
REFUSED = (403, 405, 409, 415, 501)
INTERRUPT_DELETE_TIMEOUT = 10.0     # one delete after Ctrl-C/SIGTERM: CI kills hard soon after
CLEANUP_WAIT = 30.0                 # how long a failed upload retries deleting its image


class _Refused(Exception):
    """Glance answered the data request with one of REFUSED (image deleted)."""

    def __init__(self, status: int, detail: str, image_id: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.image_id = status, detail, image_id


def _upload_once(api: Api, src: Source, *, body: Mapping[str, Any], method: str, algo: str,
                 timeout: float, cleanup_wait: float) -> Result:
    """One image: create, send, (import), verify.  The cleanup covers the
    create itself: whatever image this attempt made is deleted on any error
    or interruption, found by its ``labforge_upload_id`` when the create's
    answer never arrived."""
    upload_id = uuid.uuid4().hex
    image_id: str | None = None
    stream = None
    try:
        img = api.call("POST", "/images", json={**body, UPLOAD_ID: upload_id, OWNER: _owner_mark()},
                       ok=(201,), what=f"create image {body['name']!r}").json()
        image_id = img["id"]
        log.info("glance: created image %s %r (%s, %s); uploading %s", image_id, body["name"],
                 body["disk_format"], method, src.path)
        algos = [algo]     # one hash only: a second one would cost throughput on small machines
        t0 = time.monotonic()
        with progress(f"upload {src.path.name}", src.size) as bar:
            stream = HashingBody(src.path, src.size, algos, bar)
            _send(api, image_id, "file" if method == "direct" else "stage", stream,
                  what=f"upload {src.path.name} as image {image_id}")
        if not stream.complete:
            raise LabError(f"glance: upload of {src.path} stopped after {stream.sent} of "
                           f"{src.size} bytes; rerun")
        seconds = time.monotonic() - t0
        if method == "glance-direct":
            api.call("POST", f"/images/{image_id}/import",
                     json={"method": {"name": "glance-direct"}}, ok=(202,),
                     what=f"import image {image_id}")
        img = _wait_active(api, image_id, timeout)
        local = stream.hexdigest(algo)
        server_algo = img.get("os_hash_algo")
        if server_algo and server_algo != algo:
            local = file_hash(src.path, server_algo, f"hashing {src.path.name} ({server_algo})")
        if not img.get("os_hash_value") or img["os_hash_value"] != local:
            raise LabError(f"glance: image {image_id}: Glance's {server_algo or algo} "
                           f"{str(img.get('os_hash_value'))[:16]}… differs from the local "
                           f"{local[:16]}… of {src.path}: the upload was corrupted; rerun")
        img = _drop_owner_mark(api, img)
        return Result(img, False, method, seconds, local)
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        label = image_id or f"with {UPLOAD_ID}={upload_id}"
        with _signals_deferred(interrupted):
            if stream is not None:
                stream.close()
            stop: KeyboardInterrupt | None = None
            try:
                gone, why = _cleanup(api, image_id, upload_id, interrupted=interrupted,
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
        if isinstance(exc, _Refused) and gone and method == "direct":
            raise                       # _upload decides: glance-direct instead, or the error
        if isinstance(exc, _Refused):
            msg = api.cloud.err(f"glance: Glance at {api.cloud.endpoint} refused the {method} "
                                f"upload of {src.path} ({exc})")
        elif isinstance(exc, LabError):
            msg = exc.message
        else:
            msg = api.cloud.err(f"glance: upload of {src.path} as image {image_id} failed: "
                                f"{_first_line(exc)}")
        if gone and image_id:
            msg += f"; image {image_id} was deleted"
        elif not gone:
            msg += (f"; image {label} could not be deleted ({why}): the next labforge upload "
                    "to this cloud removes it")
        raise LabError(msg) from None


def _send(api: Api, image_id: str, target: str, stream: "HashingBody", *, what: str) -> None:
    """PUT the data to ``/images/{id}/file`` or ``/stage``.  Raises _Refused
    when Glance will not take it.  Glance checks its policy before reading
    the body and answers 403 at once; under uWSGI over TLS the connection
    then closes while the body is still being sent, so the client sees a
    lost connection (SSL EOF, reset), never the 403.  A lost connection while
    the image is still ``queued`` (Glance never started writing) is therefore
    asked again with an empty body, which gets the answer through."""
    ka = _kaexc()
    path = f"/images/{image_id}/{target}"
    headers = {"Content-Type": "application/octet-stream"}
    try:
        resp = api.image.request(path, "PUT", data=stream, headers=headers, raise_exc=False,
                                 connect_retries=0, status_code_retries=0)
    except (ka.ConnectFailure, ka.ConnectTimeout, ka.ConnectionError) as exc:
        lost = LabError(api.cloud.err(
            f"glance: {what}: Glance at {api.cloud.endpoint} is unreachable ({_reason(exc)}): "
            "check that it runs and rerun"))
        try:
            status = api.call("GET", f"/images/{image_id}", what=f"read image {image_id}",
                              connect_retries=0, timeout=10).json().get("status")
        except LabError:
            raise lost from None
        if status != "queued":
            raise lost from None
        log.debug("glance: %s: connection lost while the image is still queued (%s); "
                  "asking Glance again with an empty body", what, _reason(exc))
        try:
            resp = api._call("PUT", path, data=b"", headers=headers, what=what,
                             connect_retries=0, timeout=30)
        except LabError:
            raise lost from None
        if resp.status_code not in REFUSED:
            raise lost from None
    except ka.ClientException as exc:
        raise LabError(api.cloud.err(f"glance: {what}: {_first_line(exc)}")) from None
    if resp.status_code in REFUSED:
        raise _Refused(resp.status_code, _glance_message(resp), image_id)
    if resp.status_code not in (200, 201, 204):
        raise LabError(api.cloud.err(f"glance: {what} failed: HTTP {resp.status_code}: "
                                     f"{_glance_message(resp)}"))


def _cleanup(api: Api, image_id: str | None, upload_id: str, *, interrupted: bool,
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
            ids = [image_id] if image_id else [i["id"] for i in api.call(
                "GET", "/images", params={UPLOAD_ID: upload_id}, what="find the new image",
                connect_retries=0, timeout=timeout).json().get("images", [])]
            for iid in ids:
                api.delete(iid, timeout=timeout)
            return True, ""
        except LabError as exc:
            why = "Glance unreachable" if "unreachable" in exc.message else _short(exc.message)
        except Exception as exc:  # noqa: BLE001 - best effort while failing already
            why = _first_line(exc)[:120]
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


def _drop_owner_mark(api: Api, img: dict) -> dict:
    """Remove the in-flight mark from an active image.  After an import,
    Glance's task may save its own (older) copy of the image a moment later
    and bring the property back, so check and repeat."""
    for attempt in range(10):
        if OWNER not in img:
            return img
        if attempt:
            time.sleep(0.5)
        try:
            api.patch(img["id"], [{"op": "remove", "path": f"/{OWNER}"}])
        except LabError:
            pass            # already gone (409/400): re-read decides
        img = api.get_image(img["id"])
    return img              # harmless: cleanup only ever touches images that are not active


def _wait_active(api: Api, image_id: str, timeout: float) -> dict:
    """Wait for ``active`` and, after an import, for the import task to let
    go of the image (it holds ``os_glance_import_task`` until its last step,
    and may still save the image until then)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        img = api.get_image(image_id)
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


def _rotate(api: Api, new: dict, tag: str, keep: int | None, deactivate_old: bool) -> list[str]:
    """Only ``new`` keeps ``tag``; older images of the rotation beyond ``keep``
    are deactivated (``deactivate_old``) or deleted (``keep``)."""
    notes = []
    if tag not in new.get("tags", []):
        api.add_tag(new["id"], tag)
    untagged = []
    for img in api.list_images(tag=tag):
        if img["id"] != new["id"] and _owned(api, img):
            api.remove_tag(img["id"], tag)
            untagged.append(img["id"])
    if untagged:
        notes.append(f"tag {tag} moved from {', '.join(untagged)}")
    if keep is None and not deactivate_old:
        return notes
    family = [i for i in api.list_images(**{ROTATION: tag}) if _owned(api, i)]
    if not any(i["id"] == new["id"] for i in family):
        family.append(new)
    older = sorted((i for i in family if i["id"] != new["id"]),
                   key=lambda i: i.get("created_at", ""), reverse=True)
    n_keep = (keep or 1) - 1
    for img in older[n_keep:]:
        if img.get("protected"):
            notes.append(f"kept protected image {img['id']}")
            continue
        if deactivate_old:
            if img.get("status") == "active":
                api.call("POST", f"/images/{img['id']}/actions/deactivate", ok=(204,),
                         what=f"deactivate image {img['id']}")
                notes.append(f"deactivated {img['id']}")
        else:
            api.delete(img["id"])
            notes.append(f"deleted {img['id']}")
    return notes


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
    version = (_DEBIAN if amp.base_os == "debian" else _UBUNTU).get(release, release)
    return {"hw_architecture": _ARCH.get(amp.arch, amp.arch), "hw_rng_model": "virtio",
            "os_distro": amp.base_os, "os_version": version}


def find_amphora(lab: Lab, ws: Workspace) -> str:
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
                    method: str | None = None, min_ram: int = 1024, cacert: str | None = None, insecure: bool = False,
                    visibility: str | None = None) -> list[Outcome]:
    """Upload the amphora artifact as ``octavia.image_name`` tagged
    ``octavia.amp_image_tag`` (rotated), with Octavia's image properties."""
    if not lab.octavia.enabled:
        return [Outcome("publish-amphora", "skipped", detail="octavia.enabled is false in lab.yaml")]
    rel = find_amphora(lab, ws)
    props = {**amphora_properties(lab), **_parse_properties(properties)}
    return upload_image(
        lab, ws, image=str(ws.artifacts / rel), name=lab.octavia.image_name,
        properties=props, visibility=visibility, cloud=cloud,
        rotate_tag=lab.octavia.amp_image_tag,
        keep=keep if keep is not None else lab.glance.keep,
        deactivate_old=lab.glance.deactivate_old if deactivate_old is None else deactivate_old,
        method=method, min_disk=lab.octavia.amphora.size, min_ram=min_ram, cacert=cacert,
        insecure=insecure, kinds=("amphora",), step="publish-amphora")
