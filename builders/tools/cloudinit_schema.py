"""cloud-init's own schema, to check user-data and vendor-data before a seed
is written.

The schema ships in Debian's ``cloud-init`` package.  It is taken from the
package of the release the lab's image runs, downloaded (``apt-get
download``) and unpacked (``dpkg-deb -x``) under ``cache/cloud-init/``;
cloud-init is never installed on the build host (its services would run
there).  The host's own release uses the host's apt lists; another release
uses a private apt configuration under the cache pointing at the mirror.

Validation follows cloud-init's ``validate_cloudconfig_schema``: JSON Schema
draft 4, strings may be bytes (``!!binary``), ``deprecated`` keys are
allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from builders.core import extcmd
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write

SCHEMAS = "usr/lib/python3/dist-packages/cloudinit/config/schemas"
CLOUD_CONFIG = "schema-cloud-config-v1.json"
KEYRINGS = {"debian": "/usr/share/keyrings/debian-archive-keyring.gpg",
            "ubuntu": "/usr/share/keyrings/ubuntu-archive-keyring.gpg"}


def host_release() -> tuple[str, str]:
    """(distro id, codename) of the build host, from /etc/os-release."""
    fields = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    except OSError:
        pass
    return fields.get("ID", ""), fields.get("VERSION_CODENAME", "")


def schema_dir(cache: Path, distro: str, codename: str) -> Path:
    return cache / "cloud-init" / f"{distro}-{codename}"


def load_schema(cache: Path, distro: str, codename: str, mirror: str | None = None
                ) -> tuple[dict, str]:
    """(cloud-config schema, cloud-init version) for ``distro`` ``codename``;
    fetched into ``cache`` the first time."""
    d = schema_dir(cache, distro, codename)
    if not (d / CLOUD_CONFIG).is_file() or not (d / "VERSION").is_file():
        _fetch(d, distro, codename, mirror)
    try:
        key = (str(d), (d / CLOUD_CONFIG).stat().st_mtime_ns, (d / "VERSION").stat().st_mtime_ns)
        if key not in _LOADED:          # read once per process: a lab has many hosts
            _LOADED.clear()
            _LOADED[key] = (json.loads((d / CLOUD_CONFIG).read_text()),
                            (d / "VERSION").read_text().strip())
        return _LOADED[key]
    except (OSError, ValueError) as exc:
        raise LabError(f"{d / CLOUD_CONFIG}: unreadable ({exc}); remove {d} and rerun") from None


_LOADED: dict[tuple, tuple[dict, str]] = {}


def _fetch(d: Path, distro: str, codename: str, mirror: str | None) -> None:
    d.parent.mkdir(parents=True, exist_ok=True)
    what = f"cloud-init schema ({distro} {codename})"
    with tempfile.TemporaryDirectory(prefix=".cloud-init.", suffix=".part", dir=d.parent) as tmp:
        t = Path(tmp)
        os.chmod(t, 0o755)           # apt's _apt user writes the download here
        apt = ["apt-get", "-q"]
        if (distro, codename) != host_release():
            apt += _private_apt(t, distro, codename, mirror)
            extcmd.run([*apt, "update"], cwd=t, what=what, timeout=600)
        extcmd.run([*apt, "download", "cloud-init"], cwd=t, what=what, timeout=600)
        debs = sorted(t.glob("cloud-init_*.deb"))
        if not debs:
            raise LabError(f"{what}: `apt-get download cloud-init` left no package")
        version = extcmd.run(["dpkg-deb", "-f", debs[0], "Version"], what=what).stdout.decode().strip()
        extcmd.run(["dpkg-deb", "-x", debs[0], t / "root"], what=what)
        found = t / "root" / SCHEMAS
        if not (found / CLOUD_CONFIG).is_file():
            raise LabError(f"{what}: cloud-init {version} ships no {CLOUD_CONFIG}; "
                           "its user-data cannot be checked")
        d.mkdir(exist_ok=True)
        for f in found.glob("*.json"):
            atomic_write(d / f.name, f.read_bytes())
        atomic_write(d / "VERSION", version + "\n")


def _private_apt(t: Path, distro: str, codename: str, mirror: str | None) -> list[str]:
    """apt-get options for a private apt state reading only ``mirror``."""
    keyring = KEYRINGS.get(distro)
    if keyring is None or not Path(keyring).is_file():
        raise LabError(f"cloud-init schema: no archive keyring for {distro} ({keyring}); "
                       f"install {distro}-archive-keyring to check {codename}'s user-data")
    mirror = (mirror or ("http://deb.debian.org/debian" if distro == "debian"
                         else "http://archive.ubuntu.com/ubuntu")).rstrip("/")
    (t / "lists" / "partial").mkdir(parents=True)
    (t / "cache" / "archives" / "partial").mkdir(parents=True)
    (t / "sources.list").write_text(f"deb [signed-by={keyring}] {mirror} {codename} main\n")
    (t / "status").write_text("")
    return ["-o", f"Dir::Etc::SourceList={t / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::Cache={t / 'cache'}",
            "-o", f"Dir::State::status={t / 'status'}", "-o", "Debug::NoLocking=1"]


_VALIDATORS: dict[int, Any] = {}       # id(schema) -> (schema, its validator), per process


def _validator(schema: dict):
    """One validator per schema, made once: building it (and its reference
    registry) costs more than checking one host's user-data."""
    hit = _VALIDATORS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    from jsonschema import Draft4Validator, FormatChecker
    from jsonschema.validators import extend

    def is_string(checker, instance):
        return isinstance(instance, (str, bytes))

    validator_cls = extend(Draft4Validator,
                           type_checker=Draft4Validator.TYPE_CHECKER.redefine("string", is_string))
    validator = validator_cls(schema, format_checker=FormatChecker())
    _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def for_keys(schema: dict, keys: frozenset[str]) -> dict:
    """The schema with only the parts that can judge a mapping holding
    ``keys``.  cloud-config's schema is an ``allOf`` of one part per module,
    most of them only ``type: object`` and ``properties``: such a part can
    reject a mapping only through a key it names, so one naming none of
    ``keys`` is left out (any other part is kept).  A host's user-data uses
    a few of the ~56 modules; checking the rest costs most of the time."""
    cached = _REDUCED.get((id(schema), keys))
    if cached is not None and cached[0] is schema:
        return cached[1]
    defs = schema.get("$defs", {})
    kept = []
    for part in schema.get("allOf", ()):
        ref = part.get("$ref", "") if set(part) == {"$ref"} else ""
        target = defs.get(ref[len("#/$defs/"):]) if ref.startswith("#/$defs/") else None
        if (isinstance(target, dict) and set(target) <= {"properties", "type"}
                and target.get("type", "object") == "object"
                and not keys & set(target.get("properties", {}))):
            continue
        kept.append(part)
    reduced = {**schema, "allOf": kept} if "allOf" in schema else schema
    _REDUCED[(id(schema), keys)] = (schema, reduced)
    return reduced


_REDUCED: dict[tuple, tuple[dict, dict]] = {}


def validate(doc: Any, schema: dict, name: str, version: str) -> None:
    """Raise LabError naming the first place cloud-init's schema rejects ``doc``."""
    from jsonschema.exceptions import best_match
    if isinstance(doc, dict) and all(isinstance(k, str) for k in doc):
        schema = for_keys(schema, frozenset(doc))
    err = best_match(_validator(schema).iter_errors(doc))
    if err is None:
        return
    where = ".".join(str(p) for p in err.absolute_path) or "top level"
    message = err.message if len(err.message) <= 200 else err.message[:197] + "..."
    raise LabError(f"{name}: {where}: {message} (cloud-init {version}'s schema rejects it; "
                   "cloud-init would skip or fail this setting)")


def clear(cache: Path) -> None:
    """Forget every fetched schema (tests)."""
    shutil.rmtree(cache / "cloud-init", ignore_errors=True)
    _LOADED.clear()


def check_cloud_config(data: bytes, where: str, cache: Path, distro: str, codename: str,
                       mirror: str | None = None) -> None:
    """Check a user-data / vendor-data file that is a plain ``#cloud-config``
    against cloud-init's schema for ``distro`` ``codename`` (scripts,
    archives, MIME and jinja templates are left to cloud-init)."""
    import yaml
    text = data.decode("utf-8", "replace")
    if not text.startswith("#cloud-config") or text.startswith("#cloud-config-"):
        return
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml
    except yaml.YAMLError:
        return                  # reported with its line by the seed builder's own check
    if not isinstance(doc, dict):
        return
    schema, version = load_schema(cache, distro, codename, mirror)
    validate(doc, schema, where, version)
