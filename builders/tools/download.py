"""Resumable, verified HTTP downloads (requests), and the checksum files and
signatures that vouch for them.

:func:`download` streams a file in constant memory into a ``.part`` file
named after its published checksum, resumes it with an HTTP Range request
after an interruption (also in a later run), retries with backoff, and
verifies the checksum before the file takes its name.  :func:`fetch_checksum`
reads the expected digest from a published checksum file (SHA512SUMS,
SHA256SUMS); :func:`verify_signature` checks that file's detached signature
with gpgv when gpgv and a keyring are present.

Messages name the step (``what``) and end in ``fix``, what the user can
change (by default: the base image's settings, the first user of this).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from builders.core import extcmd
from builders.core.console import progress
from builders.core.errors import LabError
from builders.core.fsutil import CHUNK

RETRIES = 4          # attempts per request
BACKOFF = 1.0        # seconds, doubled after each failed attempt
TIMEOUT = 30         # seconds of silence before a connection counts as dropped
FIX = "check base_image.url and base_image.release"


def new_session(agent: str = "labforge", verify: str | None = None):
    """A requests session (``verify``: a CA bundle to trust instead of certifi's)."""
    import requests
    s = requests.Session()
    s.headers["User-Agent"] = agent
    if verify is not None:
        s.verify = verify
    return s


def requests_version() -> str:
    import requests
    return requests.__version__


def explain(exc: Exception) -> str:
    """A few words for a connection failure."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "host not found"),
                          ("Temporary failure in name resolution", "host not found"),
                          ("timed out", "timed out"), ("CERTIFICATE_VERIFY_FAILED",
                                                       "TLS certificate not trusted")):
        if needle in text:
            return short
    return type(exc).__name__


def get(sess, url: str, what: str, *, retries: int | None = None, backoff: float | None = None,
        fix: str = "check base_image.url and your network (or use base_image.source: build)",
        **kwargs):
    """GET with retries and backoff; HTTP errors other than 5xx are not retried."""
    import requests
    retries = RETRIES if retries is None else retries
    delay = BACKOFF if backoff is None else backoff
    last: Exception | None = None
    for attempt in range(retries):
        try:
            resp = sess.get(url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            last = exc
        else:
            if resp.status_code < 500:
                return resp
            last = LabError(f"HTTP {resp.status_code}")
            resp.close()
        if attempt < retries - 1:
            extcmd.log.debug("%s: %s; retrying in %.0fs", what, explain(last), delay)
            time.sleep(delay)
            delay *= 2
    raise LabError(f"{what}: cannot fetch {url}: {explain(last)} after {retries} attempts; {fix}")


def fetch_checksum(sess, url: str, sums_name: str, image_name: str, *, algo: str = "sha512",
                   retries: int | None = None, backoff: float | None = None,
                   what: str = "base-image", fix: str = FIX) -> tuple[str, bytes]:
    """(the expected hex digest of ``image_name``, the checksum file) from ``url + sums_name``."""
    resp = get(sess, url + sums_name, what, retries=retries, backoff=backoff)
    if resp.status_code != 200:
        raise LabError(f"{what}: {url}{sums_name}: HTTP {resp.status_code}; {fix}")
    body = resp.content
    for line in body.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == image_name:
            value = parts[0].lower()
            if len(value) != hashlib.new(algo).digest_size * 2 or \
                    not all(c in "0123456789abcdef" for c in value):
                raise LabError(f"{what}: {url}{sums_name}: the entry for {image_name} is not "
                               f"a {algo} digest ({len(value)} characters); the checksum file "
                               "is damaged: check base_image.url or try again later")
            return value, body
    raise LabError(f"{what}: {url}{sums_name} lists no {image_name}; {fix}")


def verify_signature(sess, url: str, sums_name: str, sums: bytes, signature: str,
                     keyrings: Sequence[str], workdir: Path, *, retries: int | None = None,
                     backoff: float | None = None, what: str = "base-image") -> str:
    """Check the checksum file's detached ``signature`` with gpgv: "good", or
    "not checked" when gpgv or every keyring is missing; LabError when bad."""
    keyring = next((k for k in keyrings if Path(k).is_file()), None)
    if shutil.which("gpgv") is None or keyring is None:
        extcmd.log.info("%s: %s signature not checked (needs gpgv and %s)", what, sums_name,
                        keyrings[0] if keyrings else "a keyring")
        return "not checked"
    resp = get(sess, url + signature, what, retries=retries, backoff=backoff)
    if resp.status_code != 200:
        raise LabError(f"{what}: {url}{signature}: HTTP {resp.status_code}; "
                       "the checksum file cannot be authenticated")
    (workdir / sums_name).write_bytes(sums)
    (workdir / signature).write_bytes(resp.content)
    extcmd.run(["gpgv", "--keyring", keyring, workdir / signature, workdir / sums_name],
               what=f"{what}: verifying {sums_name}")
    return "good"


def part_path(dest: Path, expected: str) -> Path:
    """Where the download of ``dest`` with that published checksum accumulates."""
    return dest.with_name(f"{dest.name}.{expected[:12].lower()}.part")


def download(url: str, dest: Path, *, expected: str, algo: str, retries: int | None = None,
             backoff: float | None = None, session=None, label: str | None = None,
             what: str = "base-image", fix: str = FIX) -> Path:
    """Download ``url`` to ``dest`` via a ``.part`` file, resuming, verified.

    The ``.part`` file survives an interrupted run; the next run asks the
    server for the rest (HTTP Range) and, if the server does not honour it,
    starts over.  It is named after the published checksum, so a part of a
    file the server has since replaced (Debian's ``latest``) is discarded
    instead of being completed into a mismatch.  Memory use is constant
    (1 MiB chunks).  A checksum mismatch deletes the download and raises.
    """
    import requests
    retries = RETRIES if retries is None else retries
    delay = BACKOFF if backoff is None else backoff
    sess = session or new_session()
    part = part_path(dest, expected)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f"{dest.name}.*part"):
        if stale != part:
            stale.unlink(missing_ok=True)
    attempt = 0
    total: int | None = None
    with progress(label or f"downloading {dest.name}", None) as bar:
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with sess.get(url, stream=True, timeout=TIMEOUT, headers=headers) as resp:
                    if resp.status_code == 416 and have:        # nothing left to fetch
                        break
                    if resp.status_code == 404:
                        raise LabError(f"{what}: {url}: HTTP 404; {fix}")
                    if resp.status_code >= 500:
                        raise requests.ConnectionError(f"HTTP {resp.status_code}")
                    if resp.status_code not in (200, 206):
                        raise LabError(f"{what}: {url}: HTTP {resp.status_code}")
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
                    raise LabError(f"{what}: downloading {url} failed: {explain(exc)} after "
                                   f"{retries} attempts; rerun to resume from "
                                   f"{part.stat().st_size if part.exists() else 0} bytes") from None
                extcmd.log.info("%s: %s; resuming in %.0fs", dest.name, explain(exc), delay)
                time.sleep(delay)
                delay *= 2
    h = hashlib.new(algo)
    with open(part, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != expected.lower():
        part.unlink(missing_ok=True)
        raise LabError(f"{what}: {url}: {algo} checksum mismatch (got {h.hexdigest()[:16]}..., "
                       f"published {expected[:16]}...); the download was deleted, rerun to fetch "
                       "it again or check base_image.url")
    os.replace(part, dest)
    return dest
