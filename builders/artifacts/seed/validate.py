"""Validation of what goes on a seed: the files a host names (user-data,
vendor-data, network-config), its write_files sources and SSH keys, the
cloud-config labforge generates, and the seed's size.

Everything here reads and checks; nothing is written.  Each problem is a
``LabError`` naming the lab file, the field and the line when there is one;
cloud-config keys cloud-init does not know are warnings (cloud-init ignores
them silently).  Whether a seed is *secret* (carries material from certs/)
is decided here too, from the same sources.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath

from builders.artifacts import kafka_node
from builders.core.errors import LabError
from builders.core.fsutil import read_regular
from builders.core.lab import SOURCE_FILE_LIMIT, Host, Lab, parse_yaml
from builders.core.workspace import Workspace
from builders.tools import keymaterial

log = logging.getLogger("labforge")

MAX_SEED_BYTES = 16 * 1024 * 1024        # see docs/seed-iso.md ("Size limit")
CERTS_PREFIX = "certs:"
SSH_KEY = re.compile(r"^(?:(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)"
                     r"\s+[A-Za-z0-9+/]+={0,3}(?:\s.*)?)$")

# Top-level keys cloud-init's modules and base config understand (from the
# cloud-init module reference and its config schema; names only).  A key not
# here is reported as a warning: cloud-init ignores unknown keys silently.
CLOUD_CONFIG_KEYS = frozenset("""
    allow_public_ssh_keys allow_userdata ansible apk_repos apt apt_pipelining apt_preserve_sources_list
    apt_reboot_if_required apt_update apt_upgrade authkey_hash autoinstall bootcmd
    byobu_by_default ca-certs ca_certs chef chpasswd cloud_config_modules
    cloud_final_modules cloud_init_modules create_hostname_file datasource
    datasource_list device_aliases disable_ec2_metadata disable_root disable_root_opts
    disk_setup drivers fan final_message fqdn fs_setup groups growpart grub-dpkg
    grub_dpkg hostname hotplug keyboard landscape launch-index locale locale_configfile
    lxd manage_etc_hosts manage_resolv_conf manual_cache_clean mcollective merge_how
    merge_type migrate mount_default_fields mounts network no_ssh_fingerprints ntp
    output package_reboot_if_required package_update package_upgrade packages password
    phone_home power_state prefer_fqdn_over_hostname preserve_hostname puppet
    random_seed reporting resize_rootfs resolv_conf rh_subscription rsyslog runcmd
    salt_minion snap spacewalk ssh ssh_authorized_keys ssh_deletekeys
    ssh_fp_console_blacklist ssh_genkeytypes ssh_import_id ssh_key_console_blacklist
    ssh_keys ssh_publish_hostkeys ssh_pwauth ssh_quiet_keygen swap system_info
    timezone ubuntu_advantage ubuntu_pro updates user users vendor_data wireguard
    write_files yum_repo_dir yum_repos zypper
""".split())

# Types cloud-init expects for the keys labforge generates (checked before writing).
GENERATED_TYPES: dict[str, type | tuple[type, ...]] = {
    "hostname": str, "fqdn": str, "manage_etc_hosts": bool, "user": dict,
    "ssh_authorized_keys": list, "ssh_pwauth": bool, "write_files": list,
    "packages": list, "runcmd": list,
}


def human(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def where(lab: Lab, field_path: str) -> str:
    """``lab.yaml: hosts.x.field``: the start of an error about a lab field."""
    return f"{lab.source.name}: {field_path}"


# --------------------------------------------------------------------------
# sources: files a host names, certs: references, SSH keys
# --------------------------------------------------------------------------
def _under(path: Path, root: Path) -> bool:
    """``path`` (symlinks followed) is ``root`` or inside it."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):       # a symlink loop: reading it fails later, clearly
        return False


def is_secret(lab: Lab, ws: Workspace, host: Host) -> bool:
    """A seed is secret when anything on it comes from the workspace's certs/:
    a ``certs:`` write_files source, or any write_files source or user-data /
    vendor-data / network-config file whose path (relative to the lab file,
    symlinks followed) lies under certs/."""
    return secret_why(lab, ws, host) is not None


def secret_why(lab: Lab, ws: Workspace, host: Host) -> str | None:
    """Why the host's seed is secret (see :func:`is_secret`; also key
    material in any file or inline content, and hard links), or None."""
    node_files = kafka_node.node_config(lab, host, ws)[0]
    for i, wf in enumerate((*host.write_files, *node_files)):
        at = (f"hosts.{host.name}.write_files[{i}]" if i < len(host.write_files)
              else f"hosts.{host.name}: the Kafka node file {wf.path}")
        if wf.source is None:
            what = keymaterial.key_material((wf.content or "").encode())
            if what:
                return f"{at}.content is {what}"
            continue
        if wf.source.startswith(CERTS_PREFIX) or _under(lab.path(wf.source), ws.certs):
            return f"{at}.source comes from certs/"
        why = _file_secret(lab.path(wf.source), ws)
        if why:
            return f"{at}.source: {why}"
    for attr in ("user_data", "vendor_data", "network_config"):
        value = getattr(host, attr)
        if value is None:
            continue
        if _under(lab.path(value), ws.certs):
            return f"hosts.{host.name}.{attr} comes from certs/"
        why = _file_secret(lab.path(value), ws)
        if why:
            return f"hosts.{host.name}.{attr}: {why}"
    return None


def _file_secret(path: Path, ws: Workspace) -> str | None:
    try:
        data = read_regular(path, "the file", SOURCE_FILE_LIMIT)
    except (OSError, LabError):
        return None             # reported where the file is read for the seed
    return keymaterial.secret_reason(path, data, ws.certs)


def check_source_place(lab: Lab, ws: Workspace, value: str, path: Path, field_path: str) -> None:
    """A write_files source lies inside the lab file's directory or certs/
    (symlinks resolved); a missing one is reported when it is read."""
    if os.path.lexists(path):
        keymaterial.check_source(value, path, lab.source.parent, ws.certs, where(lab, field_path))


def read_source(lab: Lab, path: Path, field_path: str, hint: str) -> bytes:
    """The bytes of a file lab.yaml names at ``field_path`` (a regular file of
    bounded size); a LabError ending in ``hint``."""
    try:
        return read_regular(path, "the file", SOURCE_FILE_LIMIT)
    except LabError as exc:
        raise LabError(f"{where(lab, field_path)}: {exc}") from None
    except FileNotFoundError:
        raise LabError(f"{where(lab, field_path)}: {path}: no such file; {hint}") from None
    except IsADirectoryError:
        raise LabError(f"{where(lab, field_path)}: {path}: is a directory; name a file") from None
    except OSError as exc:
        raise LabError(f"{where(lab, field_path)}: {path}: cannot read: {exc.strerror}") from None


def certs_source(lab: Lab, ws: Workspace, ref: str, field_path: str) -> Path:
    """The file a ``certs:REL`` reference names; it must stay under certs/."""
    rel = ref[len(CERTS_PREFIX):]
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or ".." in parts:
        raise LabError(f"{where(lab, field_path)}: {ref!r} must name a file under certs/, "
                       "like certs:kafka/broker1.keystore.jks")
    return ws.certs.joinpath(*parts)


def public_keys(lab: Lab, path: Path, field_path: str) -> list[str]:
    """The OpenSSH public key lines of ``path``; a private key or anything that
    is not a public key is a LabError."""
    text = path.read_text(errors="replace")
    if "PRIVATE KEY" in text:
        raise LabError(f"{where(lab, field_path)}: {path} is a private key; name the .pub file")
    found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    bad = [ln for ln in found if not SSH_KEY.match(ln)]
    if not found or bad:
        raise LabError(f"{where(lab, field_path)}: {path} is not an OpenSSH public key "
                       "(expected lines like 'ssh-ed25519 AAAA... comment')")
    return found


def check_size(lab: Lab, host: str, size: int) -> None:
    """A seed over MAX_SEED_BYTES is refused (see docs/seed-iso.md, "Size limit")."""
    if size > MAX_SEED_BYTES:
        raise LabError(f"{where(lab, f'hosts.{host}')}: the seed would hold "
                       f"{human(size)}, over the {human(MAX_SEED_BYTES)} limit; ship large "
                       "files another way (a package, a shared disk) and keep write_files small")


# --------------------------------------------------------------------------
# cloud-init inputs
# --------------------------------------------------------------------------
_SCRIPT_HEADERS = ("#!", "#include", "#include-once", "#cloud-boothook", "#part-handler",
                   "#cloud-config-jsonp")


def validate_user_data(data: bytes, name: str) -> list[str]:
    """Check user-data (or vendor-data) the way cloud-init reads it; return warnings.

    ``#cloud-config``: YAML that parses (errors name the line), a mapping,
    unknown top-level keys warned.  A script / include / boothook is taken
    as is.  A MIME multipart message: each text/cloud-config part is checked.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabError(f"{name}: not UTF-8 text (byte {exc.start}); cloud-init reads user-data "
                       "as text") from None
    first = text.split("\n", 1)[0].strip()
    if first.startswith("## template:"):                 # jinja: the next line is the header
        rest = text.split("\n", 1)[1] if "\n" in text else ""
        first = rest.split("\n", 1)[0].strip()
        if first.startswith(("#!", "#cloud-config-")):   # a script, an archive: as before
            return []
        if not first.startswith("#cloud-config"):
            raise LabError(f"{name}:2: a '## template: jinja' user-data needs #cloud-config "
                           "(or #! for a script) on its second line")
        return _check_jinja_cloud_config(text, name)
    if first.startswith("#cloud-config-archive"):
        doc = parse_yaml(text, name)
        if not isinstance(doc, list):
            raise LabError(f"{name}:1: #cloud-config-archive must be a YAML list of parts")
        return []
    if first.startswith("#cloud-config"):
        return check_cloud_config(text, name)
    if any(first.startswith(p) for p in _SCRIPT_HEADERS):
        return []
    if re.match(r"^(content-type|mime-version)\s*:", first, re.I):
        return _check_mime(data, name)
    return _bad_header(name)


_JINJA = re.compile(r"\{\{|\{%|\{#")


def _check_jinja_cloud_config(text: str, name: str) -> list[str]:
    """A cloud-config behind a '## template: jinja' line: the header line is a
    YAML comment, so the whole text is checked (line numbers stay the file's).
    Jinja syntax ({{ }}, {% %}) is often not YAML until cloud-init renders it:
    then only the header is checked, with a warning."""
    try:
        return check_cloud_config(text, name)
    except LabError as exc:
        if not _JINJA.search(text):
            raise
        msg = (f"{name}: a jinja template that is not YAML before rendering ({exc}); "
               "checked the #cloud-config header only")
        log.warning("warning: %s", msg)
        return [msg]


def _bad_header(name: str) -> list[str]:
    raise LabError(f"{name}:1: user-data must start with #cloud-config (or #! for a script, "
                   "or be a MIME multipart message)")


def _check_mime(data: bytes, name: str) -> list[str]:
    import email            # only for MIME user-data: keeps the common path's start-up short
    import email.policy
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.defects:
        raise LabError(f"{name}: not a valid MIME message ({msg.defects[0].__class__.__name__})")
    warnings: list[str] = []
    parts = list(msg.walk()) if msg.is_multipart() else [msg]
    for i, part in enumerate(parts):
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/cloud-config":
            payload = part.get_payload(decode=True) or b""
            warnings += check_cloud_config(payload.decode("utf-8", "replace"),
                                           f"{name} (MIME part {i})")
    return warnings


def check_cloud_config(text: str, name: str) -> list[str]:
    """YAML parse (with line numbers), a mapping, and warnings for unknown keys."""
    doc = parse_yaml(text, name)
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise LabError(f"{name}:1: #cloud-config must be a YAML mapping of keys, not "
                       f"{type(doc).__name__}")
    warnings = []
    for key in doc:
        if str(key) not in CLOUD_CONFIG_KEYS:
            msg = f"{name}: unknown cloud-config key {key!r}; cloud-init will ignore it"
            log.warning("warning: %s", msg)
            warnings.append(msg)
    return warnings


def validate_network_config(data: bytes, name: str) -> None:
    """network-config: YAML (line numbers), version 1 or 2, optionally under ``network:``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    doc = parse_yaml(text, name)
    if isinstance(doc, dict) and isinstance(doc.get("network"), dict):
        doc = doc["network"]
    version = doc.get("version") if isinstance(doc, dict) else None
    # type(...) is int: `version: true` is a bool, which Python would take for 1
    if type(version) is not int or version not in (1, 2):
        raise LabError(f"{name}:1: network-config must be a mapping with 'version: 1' or "
                       "'version: 2' (optionally under 'network:')")
    if version == 2:
        for section in ("ethernets", "bonds", "bridges", "vlans"):
            if section in doc and not isinstance(doc[section], dict):
                raise LabError(f"{name}: network-config {section}: expected a mapping of "
                               "interface id: settings")
    elif not isinstance(doc.get("config"), list):
        raise LabError(f"{name}: network-config version 1 needs a 'config:' list")


def check_generated(cfg: dict, at: str) -> None:
    """The keys labforge generates have the types cloud-init's schema expects."""
    for key, value in cfg.items():
        want = GENERATED_TYPES.get(key)
        if want is not None and not isinstance(value, want):
            raise LabError(f"{at}: generated {key} is {type(value).__name__}, "
                           "not what cloud-init expects (a labforge bug; please report it)")
    for item in cfg.get("packages", []):
        if not isinstance(item, str) or not item or any(c.isspace() for c in item):
            raise LabError(f"{at}.packages: {item!r} is not a package name")
    for i, item in enumerate(cfg.get("runcmd", [])):
        if not isinstance(item, (str, list)) or item == "":
            raise LabError(f"{at}.runcmd[{i}]: {item!r} is not a command")

