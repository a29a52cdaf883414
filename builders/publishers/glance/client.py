"""The connection to the cloud and the image service, with every failure as
one LabError line.

``connect`` authenticates the OpenStack way (openstacksdk's config loader:
clouds.yaml via ``--cloud``/``OS_CLOUD``/lab.yaml ``glance.cloud``, or
``OS_*`` variables; Keystone v3 password or application credential; CA
bundle / insecure as the openstack CLI has them) and finds the image
endpoint in the service catalog.  The ``Cloud`` it returns is how the rest of
the publisher reaches Glance: its methods call the SDK's image proxy
(``conn.image``: ``get_image``, ``images``, ``delete_image``, ``add_tag``,
``remove_tag``, ``update_image``, ``deactivate_image``, ``import_image``,
``get_import_info``, the ``Image`` resource's ``create``), retry a metadata
change that meets a conflict, and hand back images as Glance shows them (one
flat dict, custom properties beside the core attributes).

What the SDK lacks stays here, on the proxy's own keystoneauth adapter (same
token, TLS settings and endpoint): the data PUT with a streaming body and no
retries (``put_data``), and a delete / a lookup by a custom property bounded
in time, for the clean-up after Ctrl-C (``delete_now``, ``find_by_upload_id``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import quote

from builders.core.errors import LabError
from builders.core.extcmd import mask

log = logging.getLogger("labforge")

UPLOAD_ID = "labforge_upload_id"    # every image labforge creates carries these
OWNER = "labforge_owner"            # host:pid of the uploading process
SHA256 = "labforge_sha256"          # the file's sha256 (the manifest's hash)
ROTATION = "labforge_rotation"      # the tag this image rotates with

# a retry of an idempotent metadata change: an import task finishing can hold
# the image row for a moment (409), a restarting Glance answers 500/503
_RETRY_STATUS = (409, 500, 503)

T = TypeVar("T")


def _ka():
    from keystoneauth1 import exceptions
    return exceptions


def _sdk():
    from openstack import exceptions
    return exceptions


def _image_resource():
    from openstack.image.v2.image import Image
    return Image


# --------------------------------------------------------------------------
# connecting
# --------------------------------------------------------------------------
@dataclass
class Cloud:
    """An authenticated connection, what we know about it, and the image calls."""
    conn: Any
    label: str                      # clouds.yaml name, or "envvars" for OS_*
    auth_url: str
    project_id: str
    endpoint: str                   # the image endpoint (versioned)
    secrets: tuple[str, ...] = ()

    def err(self, text: str) -> str:
        return mask(text, self.secrets)

    @property
    def image(self):
        """The SDK's image proxy (a keystoneauth adapter on the image endpoint)."""
        return self.conn.image

    def close(self) -> None:
        self.conn.close()

    # ---- error translation -------------------------------------------------
    def unreachable(self, what: str, exc: BaseException) -> LabError:
        return LabError(self.err(f"glance: {what}: Glance at {self.endpoint} is unreachable "
                                 f"({reason(exc)}): check that it runs and rerun"))

    def call(self, what: str, fn: Callable[[], T], *, retries: int = 0) -> T:
        """``fn()`` (an SDK call); HTTP and connection errors become one
        LabError line.  ``retries`` repeats an idempotent call that met a
        conflict or a server error."""
        ka, sdk = _ka(), _sdk()
        for attempt in range(retries + 1):
            try:
                return fn()
            except sdk.HttpException as exc:
                status = exc.status_code
                if status in _RETRY_STATUS and attempt < retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                detail = glance_message(exc.response) if exc.response is not None \
                    else first_line(exc)
                raise LabError(self.err(f"glance: {what} failed: HTTP {status}: {detail}")) \
                    from None
            except (ka.ConnectFailure, ka.ConnectTimeout, ka.ConnectionError) as exc:
                raise self.unreachable(what, exc) from None
            except (ka.ClientException, sdk.SDKException) as exc:
                raise LabError(self.err(f"glance: {what}: {first_line(exc)}")) from None
        raise AssertionError("unreachable")   # the loop returns or raises

    # ---- the image proxy ---------------------------------------------------
    def get_image(self, image_id: str) -> dict:
        return view(self.call(f"read image {image_id}",
                              lambda: self.image.get_image(image_id), retries=2))

    def images(self, *, limit: int | None = None, properties: dict[str, str] | None = None,
               **filters: Any) -> list[dict]:
        """Images matching Glance's list filters (``name``, ``status``,
        ``owner``, ``tag``...), all pages or the first ``limit``.
        ``properties`` (custom properties, which the SDK does not send as
        filters) are matched here."""
        def listing() -> list[dict]:
            out = []
            query = dict(filters, **({"limit": limit} if limit else {}))
            for img in self.image.images(**query):
                flat = view(img)
                if all(flat.get(k) == v for k, v in (properties or {}).items()):
                    out.append(flat)
                if limit and len(out) >= limit:
                    break
            return out
        return self.call("list images", listing, retries=2)

    def create_image(self, attrs: dict[str, Any]) -> dict:
        """A new image record, no data yet (the SDK's ``create_image`` uploads,
        and adds properties of its own: the Image resource's create does not)."""
        Image = _image_resource()
        return view(self.call(f"create image {attrs.get('name')!r}",
                              lambda: Image.new(**attrs).create(self.image)))

    def delete_image(self, image_id: str) -> None:
        self.call(f"delete image {image_id}",
                  lambda: self.image.delete_image(image_id, ignore_missing=True))

    def add_tag(self, image_id: str, tag: str) -> None:
        # the SDK puts the tag into the path as it is: quoted, any tag works
        self.call(f"tag image {image_id}", lambda: self.image.add_tag(image_id, _q(tag)),
                  retries=4)

    def remove_tag(self, image_id: str, tag: str) -> None:
        def untag():
            try:
                self.image.remove_tag(image_id, _q(tag))
            except _sdk().NotFoundException:
                pass
        self.call(f"untag image {image_id}", untag, retries=4)

    def update_image(self, image_id: str, *, set_: dict[str, Any] | None = None,
                     remove: Iterable[str] = ()) -> dict:
        """Set attributes/properties and remove properties (one JSON-patch
        request through the SDK's ``update_image``)."""
        set_, remove = dict(set_ or {}), list(remove)

        def update():
            img = self.image.get_image(image_id)
            known = _known_fields()
            props = dict(img.properties or {})
            for k in remove:
                props.pop(k, None)
            attrs = {k: v for k, v in set_.items() if k in known}
            props.update({k: v for k, v in set_.items() if k not in known})
            return self.image.update_image(img, properties=props, **attrs)
        return view(self.call(f"update image {image_id}", update, retries=4))

    def deactivate_image(self, image_id: str) -> None:
        self.call(f"deactivate image {image_id}", lambda: self.image.deactivate_image(image_id))
        # the SDK does not look at the answer: the image's status does
        status = self.get_image(image_id).get("status")
        if status != "deactivated":
            raise LabError(f"glance: deactivate image {image_id}: Glance left it {status}; "
                           "check that the cloud's policy `deactivate` allows it for this user")

    def import_methods(self) -> list[str]:
        """The import methods Glance offers (/v2/info/import); none when it has no import API."""
        def info():
            try:
                methods = self.image.get_import_info().import_methods
            except _sdk().NotFoundException:
                return []
            return list((methods or {}).get("value") or [])
        return self.call("discover import methods", info)

    def import_image(self, image: dict, method: str) -> None:
        def start():
            img = _image_resource().existing(id=image["id"], disk_format=image.get("disk_format"),
                                             container_format=image.get("container_format"))
            resp = self.image.import_image(img, method=method)
            _sdk().raise_from_response(resp)
        self.call(f"import image {image['id']}", start)

    # ---- what the SDK lacks ------------------------------------------------
    def put_data(self, image_id: str, target: str, body: Any, *, size: int | None = None,
                 timeout: float | None = None):
        """PUT ``body`` to ``/images/{id}/file`` (direct upload) or ``/stage``
        and return the response, whatever its status.  Never retried: a
        streamed body can be sent once."""
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["X-OpenStack-Image-Size"] = str(size)
        return self.image.put(f"/images/{image_id}/{target}", data=body, headers=headers,
                              raise_exc=False, connect_retries=0, status_code_retries=0,
                              **({"timeout": timeout} if timeout else {}))

    def status_now(self, image_id: str, timeout: float) -> str | None:
        """The image's status, one try bounded by ``timeout``."""
        what = f"read image {image_id}"
        try:
            resp = self.image.get(f"/images/{image_id}", raise_exc=False, connect_retries=0,
                                  timeout=timeout)
        except _ka().ClientException as exc:
            raise self.unreachable(what, exc) from None
        if resp.status_code != 200:
            raise LabError(self.err(f"glance: {what} failed: HTTP {resp.status_code}: "
                                    f"{glance_message(resp)}"))
        return resp.json().get("status")

    def find_by_upload_id(self, upload_id: str, timeout: float) -> list[str]:
        """Ids of the images carrying ``labforge_upload_id=upload_id``: one
        list request, filtered by Glance, bounded by ``timeout``."""
        what = "find the new image"
        try:
            resp = self.image.get("/images", params={UPLOAD_ID: upload_id}, raise_exc=False,
                                  connect_retries=0, timeout=timeout)
        except _ka().ClientException as exc:
            raise self.unreachable(what, exc) from None
        if resp.status_code != 200:
            raise LabError(self.err(f"glance: {what} failed: HTTP {resp.status_code}: "
                                    f"{glance_message(resp)}"))
        return [i["id"] for i in resp.json().get("images", [])]

    def delete_now(self, image_id: str, timeout: float) -> None:
        """Delete the image, one try bounded by ``timeout`` (gone already is fine)."""
        what = f"delete image {image_id}"
        try:
            resp = self.image.delete(f"/images/{image_id}", raise_exc=False,
                                     connect_retries=0, timeout=timeout)
        except _ka().ClientException as exc:
            raise self.unreachable(what, exc) from None
        if resp.status_code not in (204, 404):
            raise LabError(self.err(f"glance: {what} failed: HTTP {resp.status_code}: "
                                    f"{glance_message(resp)}"))


def connect(cloud: str | None = None, *, cacert: str | None = None,
            insecure: bool | None = None) -> Cloud:
    """Authenticate and find the image endpoint; every failure is one LabError line."""
    import openstack.config
    import openstack.connection
    osexc = _sdk()
    ka = _ka()

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
    try:
        config = openstack.config.OpenStackConfig(load_yaml_config=True, load_envvars=True)
        region = config.get_one(cloud=cloud, **kwargs)
    except osexc.ConfigException as exc:
        raise LabError(f"glance: {where}: {first_line(exc)}; pass --cloud NAME with a clouds.yaml "
                       "entry, set OS_CLOUD, or source an openrc (OS_AUTH_URL, ...)") from None
    auth = dict(region.config.get("auth") or {})
    secrets = tuple(str(auth[k]) for k in ("password", "application_credential_secret", "token")
                    if auth.get(k))
    auth_url = str(auth.get("auth_url") or "")
    if not auth_url:
        raise LabError(f"glance: {where}: no auth_url; pass --cloud NAME with a clouds.yaml entry, "
                       "set OS_CLOUD, or source an openrc (OS_AUTH_URL, ...)")
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
    except (ka.ConnectFailure, ka.ConnectTimeout) as exc:
        raise fail(f"glance: cannot reach Keystone at {auth_url} ({reason(exc)}): check "
                   f"auth_url in {where} and that Keystone runs") from None
    except ka.EndpointNotFound:
        raise fail(f"glance: no image service (Glance) in the catalog of {auth_url} for "
                   f"region {region.region_name or '-'}: check region_name/interface in {where}") from None
    except (ka.MissingRequiredOptions, ka.AuthPluginException, ka.NoMatchingPlugin) as exc:
        raise fail(f"glance: {where}: incomplete credentials ({first_line(exc)}): set "
                   "username/password/project or an application credential") from None
    except (ka.ClientException, osexc.SDKException) as exc:
        raise fail(f"glance: authentication at {auth_url} failed: {first_line(exc)}; check "
                   f"that auth_url in {where} is Keystone's identity URL "
                   "(https://HOST:5000/v3)") from None
    if not endpoint:
        raise fail(f"glance: no image endpoint in the catalog of {auth_url}: check {where}")
    return Cloud(conn=conn, label=region.name or "envvars", auth_url=auth_url,
                 project_id=project_id or "", endpoint=endpoint.rstrip("/"), secrets=secrets)


def _image_endpoint(conn, auth_url: str, where: str, secrets: tuple[str, ...]) -> str:
    """The versioned image endpoint (catalog lookup + version discovery)."""
    osexc = _sdk()
    ka = _ka()
    catalog_url = conn.session.get_endpoint(service_type="image", interface=conn.config.get_interface(),
                                            region_name=conn.config.get_region_name("image"),
                                            skip_discovery=True)
    override = conn.config.get_endpoint("image")
    source = (f"image_endpoint_override in {where}" if override
              else f"image endpoint in the catalog of {auth_url}")
    try:
        return conn.image.get_endpoint()
    except (ka.ConnectFailure, ka.ConnectTimeout, ka.DiscoveryFailure, osexc.SDKException,
            ka.ClientException) as exc:
        raise LabError(mask(f"glance: Glance at {override or catalog_url} ({source}) does not "
                            f"answer ({reason(exc)}): check that it runs and rerun",
                            secrets)) from None


# --------------------------------------------------------------------------
# images as Glance shows them
# --------------------------------------------------------------------------
def view(img) -> dict:
    """An SDK Image as Glance's API shows it: core attributes under their
    API names (``os_hash_value``, ``protected``), custom properties beside
    them."""
    d = img.to_dict(original_names=True, body=True, headers=False, computed=False,
                    ignore_none=True)
    props = d.pop("properties", None) or {}
    return {**props, **d}


def _known_fields() -> frozenset[str]:
    """API names of the attributes the SDK's Image models (everything else
    is a custom property, kept in ``Image.properties``)."""
    global _KNOWN
    if _KNOWN is None:
        d = _image_resource().new().to_dict(original_names=True, body=True, headers=False,
                                            computed=False)
        _KNOWN = frozenset(d) - {"properties"}
    return _KNOWN


_KNOWN: frozenset[str] | None = None


def same_value(have: Any, want: Any) -> bool:
    """A property's value in Glance equals what we asked for (the SDK reads
    some properties as int or bool; Glance stores them as strings)."""
    if isinstance(have, bool) and isinstance(want, str):
        return str(have).lower() == want.lower()
    if isinstance(want, str) and isinstance(have, (int, float)):
        return str(have) == want
    return have == want


# --------------------------------------------------------------------------
# error text
# --------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def reason(exc: BaseException) -> str:
    text = first_line(exc)
    for marker in ("Connection refused", "Connection reset", "Name or service not known",
                   "timed out", "Remote end closed", "Broken pipe"):
        if marker.lower() in str(exc).lower():
            return marker.lower()
    return text[:160]


def _q(text: str) -> str:
    return quote(text, safe="")


def glance_message(resp) -> str:
    """The explanation in a Glance error response (JSON or webob's HTML page)."""
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
    # webob's error page repeats the status in <title> and <h1>: keep the explanation
    text = re.sub(r"(?is)<(head|h1)>.*?</\1>", " ", resp.text or "")
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:300] or resp.reason or "no details"

