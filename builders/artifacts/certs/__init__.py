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
from typing import Iterable

from builders.artifacts.certs import kafka, octavia, ssh
from builders.artifacts.certs.check import CertStatus, check_certs, fix_hint
from builders.artifacts.certs.common import (PUBLIC, SECRET, SETS, STATE_VERSION, Plan, ca_due,
                                             leaf_due, load_state, renewal_window, state_path,
                                             time_left)
from builders.artifacts.certs.octavia import issue_amphora_cert
from builders.artifacts.certs.ssh import SSH_KEY, lab_ssh_private_key_path, lab_ssh_public_key
from builders.core.contract import Builder, Built, Context, Output, Stage, run
from builders.core.errors import LabError
from builders.core.fsutil import private_dir
from builders.core.lab import Lab
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace

__all__ = [
    "SETS", "SECRET", "PUBLIC", "SSH_KEY", "CERTS", "Certs", "build_certs", "check_certs", "fix_hint", "CertStatus",
    "issue_amphora_cert", "lab_ssh_public_key", "lab_ssh_private_key_path", "renewal_window",
    "leaf_due", "ca_due", "time_left",
]


class Certs(Builder):
    """One output per certificate set (ssh, kafka, and octavia when enabled),
    under the builder contract with ledger "none": certs/state.json is the
    sets' own ledger and never goes to the manifest.

    :meth:`prepare` plans every set completely before anything is written;
    :meth:`build` stages each set's files (the stage leaves identical bytes
    alone, so an unchanged set is "up to date" with its mtimes kept) and the
    runner commits them all at the end, CA keys before their certificates.
    """

    name = "certs"
    kind = "certs"
    help = "Kafka and Octavia PKI under certs/"

    def outputs(self, lab: Lab, ws: Workspace, *, rotate: Iterable[str] = (), prune: bool = False,
                **_) -> list[Output]:
        rotate = tuple(rotate or ())
        unknown = [r for r in rotate if r not in SETS]
        if unknown:
            raise LabError(f"--rotate: unknown set {unknown[0]!r}; choose from {', '.join(SETS)}")
        names = ["ssh", "kafka"] + (["octavia"] if lab.octavia.enabled else [])
        shared: dict = {"rotate": rotate, "prune": prune}        # prepare() adds the plan
        return [Output(ws.certs / n, self.kind, f"certs {n}", inputs=(n,), ledger="none",
                       mode=SECRET, data=(n, shared)) for n in names]

    def prepare(self, ctx: Context, outputs: list[Output]) -> None:
        """Plan every set (load and check what exists: CA keys open, keystores
        open with the store password, inputs valid): any LabError here leaves
        certs/ exactly as it was."""
        lab, ws = ctx.lab, ctx.ws
        shared = outputs[0].data[1]
        rotate = shared["rotate"]
        old = load_state(ws)
        new: dict = {"version": STATE_VERSION}
        plan = Plan(ws)
        sets: dict[str, tuple[list[str], list, list]] = {}    # notes, writes, removes

        def planned(name: str, fn, *args) -> None:
            writes_before, first_remove = set(plan.writes), len(plan.removes)
            notes, _ = fn(*args)
            sets[name] = (notes, [p for p in plan.writes if p not in writes_before],
                          plan.removes[first_remove:])

        try:
            planned("ssh", ssh.plan, lab, ws, old.get("ssh"), "ssh" in rotate, plan, new)
            planned("kafka", kafka.plan, lab, ws, old.get("kafka"), "kafka" in rotate,
                    ctx.force, plan, new, shared["prune"])
            if lab.octavia.enabled:
                planned("octavia", octavia.plan, lab, ws, old.get("octavia"),
                        "octavia" in rotate, ctx.force, plan, new)
            elif "octavia" in old:
                new["octavia"] = old["octavia"]  # disabled: keep what exists, untouched
        finally:
            plan.close()        # keys made ahead and not needed (a set refused) stop here
        plan.put(state_path(ws), json.dumps(new, indent=2, sort_keys=True) + "\n", PUBLIC)
        shared["plan"], shared["sets"] = plan, sets
        # state.json goes with a set that changes anyway, so that a set whose
        # files stay the same is reported "up to date"
        changing = [o.data[0] for o in outputs if _changes(plan, *sets[o.data[0]][1:])]
        shared["state_with"] = (changing or [outputs[-1].data[0]])[0]

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        return None           # the plan knows: build() stages, identical files stay untouched

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        name, shared = out.data
        plan: Plan = shared["plan"]
        notes, writes, removes = shared["sets"][name]
        if name == shared["state_with"]:
            writes = [*writes, state_path(ctx.ws)]
        ctx.ws.certs_dir()          # certs/ itself 0700 before anything lands under it
        for path in writes:
            data, mode = plan.writes[path]
            private_dir(path.parent)
            stage.write(path, data, mode)
        for path in removes:          # `certs --prune` of a broker gone from lab.yaml
            if path not in plan.writes:
                stage.remove(path)
        return Built("; ".join(notes))

    def ready(self, lab: Lab, ws: Workspace) -> str | None:
        return None if state_path(ws).is_file() else f"{ws.certs} has no certificates"


def _changes(plan: Plan, writes: list, removes: list) -> bool:
    """Whether committing these writes and removes would change certs/."""
    for path in writes:
        try:
            if path.read_bytes() != plan.writes[path][0]:
                return True
        except OSError:
            return True
    return any(p.exists() and p not in plan.writes for p in removes)


CERTS = Certs()


def build_certs(lab: Lab, ws: Workspace, *, force: bool = False,
                rotate: Iterable[str] = (), prune: bool = False) -> list[Outcome]:
    """Issue or refresh every certificate set of the lab under ``ws.certs``.

    Identities no longer in the lab keep their keys and stores (reported as
    kept) unless ``prune``, which removes them and lists what went.

    ``force`` re-issues every leaf (keys, certificates, stores) under the
    existing CAs; ``rotate`` names sets ("kafka", "octavia", "ssh") whose CAs
    (or SSH key) are replaced deliberately, with everything they signed.
    """
    return run(CERTS, lab, ws, force=force, rotate=tuple(rotate or ()), prune=prune)
