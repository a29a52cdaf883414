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

import json
import time
from pathlib import Path
from typing import Iterable

from builders.artifacts.certs import kafka, octavia, ssh
from builders.artifacts.certs.check import CertStatus, check_certs, fix_hint
from builders.artifacts.certs.common import (PUBLIC, SECRET, SETS, STATE_VERSION, Plan, ca_due,
                                             leaf_due, load_state, renewal_window, state_path,
                                             time_left)
from builders.artifacts.certs.octavia import issue_amphora_cert
from builders.artifacts.certs.ssh import SSH_KEY, lab_ssh_private_key_path, lab_ssh_public_key
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

__all__ = [
    "SETS", "SECRET", "PUBLIC", "SSH_KEY", "build_certs", "check_certs", "fix_hint", "CertStatus",
    "issue_amphora_cert", "lab_ssh_public_key", "lab_ssh_private_key_path", "renewal_window",
    "leaf_due", "ca_due", "time_left",
]


def build_certs(lab: Lab, ws: Workspace, *, force: bool = False,
                rotate: Iterable[str] = ()) -> list[Outcome]:
    """Issue or refresh every certificate set of the lab under ``ws.certs``.

    ``force`` re-issues every leaf (keys, certificates, stores) under the
    existing CAs; ``rotate`` names sets ("kafka", "octavia", "ssh") whose CAs
    (or SSH key) are replaced deliberately, with everything they signed.
    """
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
        planned("ssh", ssh.plan, lab, ws, old.get("ssh"), "ssh" in rotate, plan, new)
        planned("kafka", kafka.plan, lab, ws, old.get("kafka"), "kafka" in rotate,
                force, plan, new)
        if lab.octavia.enabled:
            planned("octavia", octavia.plan, lab, ws, old.get("octavia"),
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
