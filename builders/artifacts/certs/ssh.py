"""certs/ssh/: the lab SSH key pair, the default authorized key of every VM."""

from __future__ import annotations

from pathlib import Path

from builders.artifacts.certs.common import PUBLIC, SECRET, Plan, exists, read_bytes
from builders.core.errors import LabError
from builders.core.lab import Lab
from builders.core.workspace import Workspace
from builders.tools import pki

SSH_KEY = "lab_ed25519"


def plan(lab: Lab, ws: Workspace, st: dict | None, rotate: bool, plan: Plan,
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
