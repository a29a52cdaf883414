"""`invoke certs-check`: every certificate of the lab with subject, SANs,
days to expiry, problems, and what to run about them."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from builders.artifacts.certs.kafka import cert_files as kafka_cert_files
from builders.artifacts.certs.octavia import cert_files as octavia_cert_files
from builders.artifacts.certs.common import RENEW_DAYS, leaf_due
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.workspace import Workspace
from builders.tools import pki


@dataclass
class CertStatus:
    set: str
    path: Path
    subject: str
    sans: list[str]
    days_left: int
    issuer_path: Path | None
    problems: list[str]
    fixes: list[str] = field(default_factory=list)   # what to run about the problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self, root: Path) -> str:
        rel = self.path.relative_to(root) if self.path.is_relative_to(root) else self.path
        sans = ", ".join(self.sans) if self.sans else "-"
        status = "ok" if self.ok else "; ".join(self.problems)
        return f"{rel}: {self.subject} [{sans}] {self.days_left} days left: {status}"


def check_certs(lab: Lab, ws: Workspace, warn_days: int = 30) -> list[CertStatus]:
    """Every certificate of the lab with subject, SANs, days to expiry and problems.

    A problem: missing or unreadable, expiring within ``warn_days``, not
    signed by (or not chaining to) its CA, not yet valid.  Raises LabError
    when certs/ holds no certificate set at all.
    """
    pairs: list[tuple[str, Path, Path | None]] = []   # set, cert, issuer cert
    pairs += [("kafka", c, i) for c, i in kafka_cert_files(lab, ws)]
    if lab.octavia.enabled:
        pairs += [("octavia", c, i) for c, i in octavia_cert_files(lab, ws)]
    if not any(c.exists() for _, c, _ in pairs):
        raise LabError(f"{ws.certs}: no certificates found; run `invoke certs` first")
    now = _dt.datetime.now(_dt.timezone.utc)
    loaded: dict[Path, object] = {}

    def load(p: Path):
        if p not in loaded:
            try:
                loaded[p] = pki.load_certs(p.read_bytes())[0]
            except (OSError, ValueError, IndexError):
                loaded[p] = None
        return loaded[p]

    out = []
    for set_name, cp, ip in pairs:
        rotate = f"run `invoke certs --rotate {set_name}`"
        cert = load(cp)
        if cert is None:
            out.append(CertStatus(set_name, cp, "?", [], 0, ip,
                                  ["missing or not a PEM certificate; run `invoke certs`"],
                                  ["run `invoke certs`"]))
            continue
        problems = []
        fixes = []
        days = (cert.not_valid_after_utc - now).days
        expiring = cert.not_valid_after_utc <= now or days < warn_days
        if cert.not_valid_after_utc <= now:
            problems.append("EXPIRED")
        elif days < warn_days:
            problems.append(f"expires within {warn_days} days")
        if cert.not_valid_before_utc > now + _dt.timedelta(minutes=5):
            problems.append("not valid yet")
            fixes.append(rotate if ip is None else "run `invoke certs --force`")
        issuer = load(ip) if ip else cert
        if issuer is None:
            problems.append(f"its CA {ip.name} is missing")
            fixes.append("run `invoke certs`")
        elif not pki.signed_by(cert, issuer):
            problems.append(f"not signed by {ip.name if ip else 'itself'}")
            fixes.append(rotate if ip is None else "run `invoke certs`")
        if expiring:
            if ip is None:
                fixes.append(rotate)                      # a CA is never renewed silently
            elif issuer is None:
                pass
            elif (cert.not_valid_after_utc - cert.not_valid_before_utc).days < warn_days \
                    and cert.not_valid_after_utc < issuer.not_valid_after_utc:
                fixes.append("raise pki.leaf_days above --warn-days and run `invoke certs "
                             "--force`, or lower --warn-days (the leaves live shorter)")
            else:
                due = leaf_due(cert, issuer, now)
                fixes.append({
                    "renew": "run `invoke certs` to renew the expiring leaves",
                    "ca": f"{rotate} (a leaf cannot outlive its CA)",
                    "ok": "run `invoke certs --force` to re-issue the leaves now (`invoke "
                          f"certs` renews a leaf only in its last {RENEW_DAYS} days)",
                }[due])
        out.append(CertStatus(set_name, cp, cert.subject.rfc4514_string(), pki.sans_of(cert),
                              days, ip, problems, list(dict.fromkeys(fixes))))
    return out


def fix_hint(rows: Iterable[CertStatus]) -> str:
    """What to run for the certificates with problems, each distinct fix once."""
    fixes = [f for r in rows if not r.ok for f in r.fixes]
    return "; ".join(dict.fromkeys(fixes)) or "run `invoke certs`"
