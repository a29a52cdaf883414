"""What every certificate set shares: file modes, the plan (everything to
write, computed before anything is written), renewal rules, certs/state.json,
reading files under certs/.

``certs/state.json`` records per identity the digest of its inputs, the
serial and the fingerprint (never a secret).  Certs are deliberately not
recorded in artifacts/manifest.json: that file is publishable, certs/ is not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from builders.core.errors import LabError
from builders.core.workspace import Workspace
from builders.tools import pki

SETS = ("kafka", "octavia", "ssh")
STATE_VERSION = 1
SECRET = 0o600
PUBLIC = 0o644

# Renewal: `invoke certs` re-issues a leaf (new key, same CA) once less than
# RENEW_DAYS of it are left, or less than a third of its validity when that
# is shorter (so that a deliberately short-lived leaf is not renewed on every
# run).  A CA is never renewed: an expiring CA needs `--rotate SET`.
RENEW_DAYS = 30
RENEW_FRACTION = 3


def renewal_window(cert) -> _dt.timedelta:
    """How long before its end a leaf is renewed: 30 days, or a third of its life."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return min(_dt.timedelta(days=RENEW_DAYS), life / RENEW_FRACTION)


def leaf_due(cert, ca, now: _dt.datetime | None = None) -> str:
    """"ok", "renew" (inside its renewal window; a new leaf from ``ca`` would
    last longer) or "ca" (inside the window but it already ends with its CA:
    only rotating the CA helps)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if cert.not_valid_after_utc - now >= renewal_window(cert):
        return "ok"
    return "renew" if cert.not_valid_after_utc < ca.not_valid_after_utc else "ca"


def ca_due(ca, now: _dt.datetime | None = None) -> bool:
    """True when a CA has less than the renewal window left (rotate it)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return ca.not_valid_after_utc - now < renewal_window(ca)


def time_left(cert, now: _dt.datetime | None = None) -> str:
    """"expired", "under a day left" or "N days left"."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    left = cert.not_valid_after_utc - now
    if left <= _dt.timedelta(0):
        return "expired"
    return "under a day left" if left.days < 1 else f"{left.days} days left"


# --------------------------------------------------------------------------
# plan: everything to write, computed before anything is written
# --------------------------------------------------------------------------
@dataclass
class Plan:
    """Every file the sets will write (path -> bytes, mode) and remove; the
    certs builder stages them once every set is planned."""
    ws: Workspace
    writes: dict[Path, tuple[bytes, int]] = field(default_factory=dict)
    removes: list[Path] = field(default_factory=list)
    supplies: list[pki.KeySupply] = field(default_factory=list)

    def put(self, path: Path, data: bytes | str, mode: int = SECRET) -> None:
        self.writes[path] = (data.encode() if isinstance(data, str) else data, mode)

    def keys(self, n: int, key_type: str, rsa_bits: int) -> pki.KeySupply:
        """A set's ``n`` new keys, made in parallel from now on (see
        :class:`pki.KeySupply`); :meth:`close` stops what was not needed."""
        supply = pki.KeySupply(n, key_type, rsa_bits)
        self.supplies.append(supply)
        return supply

    def close(self) -> None:
        for supply in self.supplies:
            supply.close()


def read_bytes(path: Path, what: str, hint: str = "run `invoke certs`") -> bytes:
    """A file under certs/; any problem reading it is a LabError ending in ``hint``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LabError(f"{path}: {what} is missing; {hint}") from None
    except IsADirectoryError:
        raise LabError(f"{path}: cannot read {what}: it is a directory; {hint}") from None
    except OSError as exc:
        raise LabError(f"{path}: cannot read {what}: {exc.strerror}; {hint}") from None


def exists(path: Path) -> bool:
    return os.path.lexists(path)


# --------------------------------------------------------------------------
# state.json
# --------------------------------------------------------------------------
def state_path(ws: Workspace) -> Path:
    return ws.certs / "state.json"


def load_state(ws: Workspace) -> dict:
    p = state_path(ws)
    if not p.exists():
        return {"version": STATE_VERSION}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"{p}: unreadable ({exc}); remove it and rerun `invoke certs` "
                       "(existing CAs are kept, leaves are re-issued)") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise LabError(f"{p}: unknown format; remove it and rerun `invoke certs` "
                       "(existing CAs are kept, leaves are re-issued)")
    return data


def cert_record(cert, digest: str, **extra) -> dict:
    return {"digest": digest, "serial": format(cert.serial_number, "x"),
            "fingerprint_sha256": pki.fingerprint(cert),
            "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(), **extra}
