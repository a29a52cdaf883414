"""`invoke certs` / `invoke certs-check`: the lab's PKI under certs/.

Three sets, each idempotent on its own:

* ``kafka``   certs/kafka/: a CA, one identity per broker plus the client,
              PEM + PKCS#12 + JKS for each, truststores, .properties files.
* ``octavia`` certs/octavia/: Octavia's dual CA set, passphrases, heartbeat
              key, the amphora SSH key and ``octavia-certificates.conf``.
* ``ssh``     certs/ssh/: the lab SSH key pair, the default authorized key of
              every VM.

A run first *plans* every set completely in memory (loading and checking
what exists: CA keys open, keystores open with the store password, inputs
valid) and only then writes; a problem found while planning leaves certs/
exactly as it was.  Files whose content is unchanged are not rewritten, so a
second run changes nothing (same bytes, same mtimes).

``certs/state.json`` records per identity the digest of its inputs, the
serial and the fingerprint (never a secret).  An identity is re-issued when
its digest changes (a broker's IP, the domain, key settings...) or its files
are gone; the CA is never replaced unless ``rotate`` names its set.
Certs are deliberately not recorded in artifacts/manifest.json: that file is
publishable, certs/ is not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from builders.tools import pki
from builders.core.errors import LabError
from builders.core.fsutil import read_regular, atomic_write, private_dir
from builders.core.lab import Lab
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

SETS = ("kafka", "octavia", "ssh")
STATE_VERSION = 1
SECRET = 0o600
PUBLIC = 0o644

SSH_KEY = "lab_ed25519"

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
    ws: Workspace
    writes: dict[Path, tuple[bytes, int]] = field(default_factory=dict)
    removes: list[Path] = field(default_factory=list)

    def put(self, path: Path, data: bytes | str, mode: int = SECRET) -> None:
        self.writes[path] = (data.encode() if isinstance(data, str) else data, mode)

    def commit(self) -> list[Path]:
        """Write what changed; return the paths written or removed."""
        changed: list[Path] = []
        self.ws.certs_dir()     # certs/ itself 0700 before anything lands under it
        for path, (data, mode) in self.writes.items():
            private_dir(path.parent)
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if same:
                if path.stat().st_mode & 0o777 != mode:
                    os.chmod(path, mode)
                continue
            atomic_write(path, data, mode=mode)
            changed.append(path)
        for path in self.removes:
            if path.exists() and path not in self.writes:
                path.unlink()
                changed.append(path)
        return changed


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


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def build_certs(lab: Lab, ws: Workspace, *, force: bool = False,
                rotate: Iterable[str] = (), prune: bool = False) -> list[Outcome]:
    """Issue or refresh every certificate set of the lab under ``ws.certs``.

    Identities no longer in the lab keep their keys and stores (reported as
    kept) unless ``prune``, which removes them and lists what went.

    ``force`` re-issues every leaf (keys, certificates, stores) under the
    existing CAs; ``rotate`` names sets ("kafka", "octavia", "ssh") whose CAs
    (or SSH key) are replaced deliberately, with everything they signed.
    """
    from builders.artifacts import certs_kafka
    from builders.artifacts import certs_octavia

    rotate = tuple(rotate)
    unknown = [r for r in rotate if r not in SETS]
    if unknown:
        raise LabError(f"--rotate: unknown set {unknown[0]!r}; choose from {', '.join(SETS)}")
    with BuildLock(ws):
        started = time.monotonic()
        old = load_state(ws)
        new: dict = {"version": STATE_VERSION}
        plan = Plan(ws)
        # set name, notes, its outputs, the files it removes
        results: list[tuple[str, list[str], list[Path], list[Path]]] = []

        def planned(name: str, fn, *args) -> None:
            first_remove = len(plan.removes)
            notes, paths = fn(*args)
            results.append((name, notes, paths, plan.removes[first_remove:]))

        # plan every set first: any LabError here leaves certs/ untouched
        planned("ssh", plan_ssh, lab, ws, old.get("ssh"), "ssh" in rotate, plan, new)
        planned("kafka", certs_kafka.plan, lab, ws, old.get("kafka"), "kafka" in rotate,
                force, plan, new, prune)
        if lab.octavia.enabled:
            planned("octavia", certs_octavia.plan, lab, ws, old.get("octavia"),
                    "octavia" in rotate, force, plan, new)
        elif "octavia" in old:
            new["octavia"] = old["octavia"]  # disabled: keep what exists, untouched
        plan.put(state_path(ws), json.dumps(new, indent=2, sort_keys=True) + "\n", PUBLIC)
        changed = set(plan.commit())
        secs = time.monotonic() - started
        outcomes = []
        for name, notes, set_paths, set_removes in results:
            # a removed file (a broker gone from lab.yaml) is a change too
            touched = [p for p in (*set_paths, *set_removes) if p in changed]
            status = "built" if touched else "up to date"
            detail = "; ".join(notes) if touched or notes else ""
            outcomes.append(Outcome(f"certs {name}", status, sorted(set_paths), detail,
                                    secs if touched else 0.0))
        return outcomes


def plan_ssh(lab: Lab, ws: Workspace, st: dict | None, rotate: bool, plan: Plan,
             new: dict) -> tuple[list[str], list[Path]]:
    """The lab SSH key pair (certs/ssh/lab_ed25519[.pub])."""
    d = ws.certs / "ssh"
    priv_p, pub_p = d / SSH_KEY, d / f"{SSH_KEY}.pub"
    comment = f"labforge@{lab.name}"
    notes: list[str] = []
    key = None
    if exists(priv_p) and not rotate:
        try:
            key = pki.load_ssh_key(read_bytes(priv_p, "the lab SSH private key"))
        except (ValueError, TypeError, pki.UnsupportedAlgorithm):
            raise LabError(f"{priv_p}: not an unencrypted OpenSSH private key; restore it or "
                           "run `invoke certs --rotate ssh` to make a new lab key") from None
        files = pki.ssh_key_files(key, comment)
        pub = files.public
        if exists(pub_p):
            on_disk = read_bytes(pub_p, "the lab SSH public key")
            if on_disk.split()[:2] == pub.split()[:2]:
                pub = on_disk  # keep the user's comment
        else:
            notes.append("public key rewritten")
        plan.put(priv_p, read_bytes(priv_p, "the lab SSH private key"), SECRET)
        plan.put(pub_p, pub, PUBLIC)
    elif exists(pub_p) and not rotate:
        raise LabError(f"{priv_p}: missing while {pub_p.name} exists (VMs may trust it); "
                       "restore it or run `invoke certs --rotate ssh` to make a new lab key")
    else:
        files = pki.new_ssh_key(comment)
        plan.put(priv_p, files.private, SECRET)
        plan.put(pub_p, files.public, PUBLIC)
        pub = files.public
        notes.append("new lab SSH key" + (" (rotated)" if rotate else ""))
    new["ssh"] = {"lab_key": {"fingerprint": pki.ssh_fingerprint(pub), "type": "ssh-ed25519"}}
    return notes, [priv_p, pub_p]


def lab_ssh_public_key(ws: Workspace) -> str:
    """The lab's SSH public key line (the default authorized key of every VM)."""
    p = ws.certs / "ssh" / f"{SSH_KEY}.pub"
    try:
        text = p.read_text().strip()
    except FileNotFoundError:
        raise LabError(f"{p}: the lab SSH key is missing; run `invoke certs` first") from None
    except OSError as exc:
        raise LabError(f"{p}: cannot read the lab SSH key: {exc.strerror}") from None
    if not text.startswith("ssh-"):
        raise LabError(f"{p}: not an OpenSSH public key; run `invoke certs --rotate ssh`")
    return text


def lab_ssh_private_key_path(ws: Workspace) -> Path:
    """Where the lab's SSH private key is (for `ssh -i`)."""
    p = ws.certs / "ssh" / SSH_KEY
    if not p.exists():
        raise LabError(f"{p}: the lab SSH key is missing; run `invoke certs` first")
    return p


def issue_amphora_cert(lab: Lab, ws: Workspace, amphora_id: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for one amphora, signed by the Octavia server CA."""
    from builders.artifacts.certs_octavia import issue_amphora_cert as _issue
    return _issue(lab, ws, amphora_id)


# --------------------------------------------------------------------------
# certs-check
# --------------------------------------------------------------------------
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
    from builders.artifacts import certs_kafka
    from builders.artifacts import certs_octavia

    pairs: list[tuple[str, Path, Path | None]] = []   # set, cert, issuer cert
    pairs += [("kafka", c, i) for c, i in certs_kafka.cert_files(lab, ws)]
    if lab.octavia.enabled:
        pairs += [("octavia", c, i) for c, i in certs_octavia.cert_files(lab, ws)]
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
        for problem in _key_and_store_problems(cp, cert, ip is None):
            problems.append(problem)
            fixes.append(rotate if ip is None else "run `invoke certs --force`")
        out.append(CertStatus(set_name, cp, cert.subject.rfc4514_string(), pki.sans_of(cert),
                              days, ip, problems, list(dict.fromkeys(fixes))))
    return out


def _read_text(p: Path) -> str | None:
    try:
        return read_regular(p, p.name, 4096).decode().strip()
    except (OSError, LabError, UnicodeDecodeError):
        return None


def _key_and_store_problems(cp: Path, cert, is_ca: bool) -> list[str]:
    """A certificate's key loads and belongs to it; its keystores (Kafka:
    <id>.keystore.p12/.jks, for the CA the truststores) open with the stored
    password and hold that key."""
    d, name = cp.parent, cp.name
    out: list[str] = []
    passphrase = None
    if name.endswith(".cert.pem"):                       # Octavia CA: encrypted key
        key_p = d / (name[:-len(".cert.pem")] + ".key.pem")
        passphrase = _read_text(d / "ca_private_key_passphrase")
    elif name.endswith(".crt"):
        key_p = cp.with_suffix(".key")
    else:                                                # client.cert-and-key.pem
        key_p = cp
    try:
        key_data = read_regular(key_p, "the key", 1 << 20)
    except (OSError, LabError):
        out.append(f"its key {key_p.name} is missing or unreadable")
    else:
        why = pki.key_problem(cert, key_data, passphrase)
        if why:
            out.append(f"{why} ({key_p.name})")
    if not name.endswith(".crt"):
        return out
    password = _read_text(d / "store.password")
    stem = cp.stem
    stores = ([(d / f"truststore.{k}", k, None) for k in ("p12", "jks")] if is_ca else
              [(d / f"{stem}.keystore.{k}", k, cert) for k in ("p12", "jks")])
    for store, kind, owner in stores:
        try:
            data = read_regular(store, "the store", 16 << 20)
        except (OSError, LabError):
            out.append(f"{store.name} is missing or unreadable")
            continue
        why = "store.password is missing or unreadable" if password is None else \
            pki.store_problem(data, kind, password, owner)
        if why:
            out.append(f"{store.name} {why}")
    return out


def fix_hint(rows: Iterable[CertStatus]) -> str:
    """What to run for the certificates with problems, each distinct fix once."""
    fixes = [f for r in rows if not r.ok for f in r.fixes]
    return "; ".join(dict.fromkeys(fixes)) or "run `invoke certs`"
