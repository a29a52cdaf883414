"""cloud-init NoCloud seeds: one volume labelled ``cidata`` per host.

The package reads top to bottom:

- ``validate``: checks of what goes on a seed (files a host names,
  write_files sources, SSH keys, generated cloud-config, size), and whether
  a seed is secret;
- ``rendering``: meta-data / user-data / network-config from lab.yaml;
- ``iso`` (ISO 9660 via pycdlib) and ``vfat`` (FAT12): the volume formats;
- this module: the builder (``invoke seed-iso``, the ``seed-iso`` step of
  ``invoke all``) and where each seed goes.

Seeds are reproducible: timestamps come from ``SOURCE_DATE_EPOCH`` (or a
fixed date), files are in a fixed order, so the same inputs give the same
bytes.  A seed that carries material from certs/ (a ``write_files[].source``
of ``"certs:..."`` or any path that resolves under certs/, or a user-data /
vendor-data / network-config file there) is secret: it is written to
``certs/seed/<host>.iso`` (0600) and kept out of the manifest.  See
docs/seed-iso.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from builders.artifacts.seed.iso import make_iso, pycdlib_version, read_seed
from builders.artifacts.seed.rendering import (GENERATOR, VOLUME_ID, Seed, dump_yaml, host_of,
                                               network_config, render)
from builders.artifacts.seed.validate import (CERTS_PREFIX, MAX_SEED_BYTES, check_cloud_config,
                                              is_secret, validate_network_config,
                                              validate_user_data)
from builders.artifacts.seed.vfat import make_vfat as _fat12
from builders.core.contract import Builder, Built, Context, Output, Stage, ledger_for, run
from builders.core.errors import LabError
from builders.core.lab import Host, Lab
from builders.core.manifest import SecretLedger
from builders.core.outcome import Outcome
from builders.core.workspace import Workspace

__all__ = [
    "KIND", "KIND_VFAT", "FORMATS", "DEFAULT_EPOCH", "GENERATOR", "VOLUME_ID", "MAX_SEED_BYTES",
    "CERTS_PREFIX", "Seed", "render", "dump_yaml", "network_config", "is_secret",
    "validate_user_data", "validate_network_config", "check_cloud_config", "make_iso",
    "make_vfat", "read_seed", "seed_path", "seed_marker", "source_date_epoch", "build_seed_isos", "SEEDS", "Seeds",
]

KIND = "seed-iso"
KIND_VFAT = "seed-vfat"                  # --format vfat: artifacts/seed/<host>.img
FORMATS = ("iso", "vfat")
DEFAULT_EPOCH = 1577836800               # 2020-01-01T00:00:00Z when SOURCE_DATE_EPOCH is unset


def make_vfat(files: dict[str, bytes], epoch: int) -> bytes:
    """The FAT12 image (label cidata) of ``files``; see seed/vfat.py."""
    return _fat12(files, epoch, label=VOLUME_ID)


def seed_path(lab: Lab, ws: Workspace, host: Host | str, *, fmt: str = "iso") -> Path:
    """Where the host's seed is written: artifacts/seed/<host>.iso, or
    certs/seed/<host>.iso for a seed that carries secrets (``.img`` for vfat)."""
    h = host_of(lab, host)
    suffix = ".iso" if fmt == "iso" else ".img"
    base = ws.certs if is_secret(lab, ws, h) else ws.artifacts
    return base / "seed" / f"{h.name}{suffix}"


def seed_marker(lab: Lab, host: Host | str, ws: Workspace | None = None) -> str:
    """The line the seed's runcmd prints to the serial console when cloud-init
    applied it: ``labforge-seed-ok <host> <instance-id>``.

    The instance-id depends on the seed's content, which includes files from
    the workspace (the lab SSH key, certs); pass the workspace the seed was
    built in (default: ``Workspace.default(lab)``, as the CLI uses).
    """
    return render(lab, ws or Workspace.default(lab), host).marker


def source_date_epoch() -> int:
    """Seed timestamps: SOURCE_DATE_EPOCH when set (reproducible-builds.org), else a fixed date."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return DEFAULT_EPOCH
    if not raw.isdigit() or not 0 < int(raw) < 253402300800:
        raise LabError(f"SOURCE_DATE_EPOCH: {raw!r} is not a number of seconds since 1970; "
                       "unset it or give e.g. $(git log -1 --format=%ct)")
    return int(raw)


# --------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------
def _shown(ws: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _elsewhere(ws: Workspace, path: Path) -> Path:
    """The other place a seed of this name could be: a seed moves between
    artifacts/seed/ and certs/seed/ when a certs: source is added or removed."""
    public, secret = ws.artifacts / "seed" / path.name, ws.certs / "seed" / path.name
    return public if path == secret else secret


class Seeds(Builder):
    """One seed per host.  Every seed is rendered and validated in
    :meth:`outputs`, so a bad input anywhere stops the run before any file is
    written; the runner's stage then commits all seeds at once (one journal
    commit for many seeds) and records the public ones in the manifest with
    one rewrite.  A secret seed (carrying certs/ material) goes to
    certs/seed/<host>.iso, 0600, recorded in that directory's ledger, never
    in the manifest."""

    name = "seed-iso"
    kind = KIND
    help = "cloud-init seed ISO per host"
    needs = ("certs",)

    def outputs(self, lab: Lab, ws: Workspace, *, hosts: Iterable[str] | None = None,
                fmt: str = "iso", **_) -> list[Output]:
        if fmt not in FORMATS:
            raise LabError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
        chosen = [lab.host(n) for n in names]
        if not chosen:
            raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to seed")
        epoch = source_date_epoch()
        tool = pycdlib_version()
        kind = KIND if fmt == "iso" else KIND_VFAT
        outs = []
        for h in chosen:
            seed = render(lab, ws, h)
            outs.append(Output(seed_path(lab, ws, h, fmt=fmt), kind, f"{kind} {h.name}",
                               inputs=(fmt, seed.files, epoch, tool),
                               ledger="secret" if seed.secret else "manifest",
                               mode=0o600 if seed.secret else 0o644,
                               data=(seed, fmt, epoch, tool)))
        return outs

    def prepare(self, ctx: Context, outputs: list[Output]) -> None:
        """A seed that moved between artifacts/ and certs/ loses its old
        record first, so no ledger names a copy the build is about to
        remove (a stale public seed would be published)."""
        for out in outputs:
            old = _elsewhere(ctx.ws, out.path)
            ledger = ctx.manifest if old.parent == ctx.ws.artifacts / "seed" \
                else SecretLedger(old.parent)
            if ledger.path.exists() and ledger.get(old) is not None:
                ledger.remove(old)

    def up_to_date(self, ctx: Context, out: Output, digest: str) -> str | None:
        if os.path.lexists(_elsewhere(ctx.ws, out.path)):
            return None                   # the old copy must go
        current = super().up_to_date(ctx, out, digest)
        return None if current is None else _shown(ctx.ws, out.path)

    def build(self, ctx: Context, out: Output, stage: Stage) -> Built:
        seed, fmt, epoch, tool = out.data
        image = make_iso(seed.files, epoch) if fmt == "iso" else make_vfat(seed.files, epoch)
        if seed.secret:
            ctx.ws.certs_dir("seed")      # 0700, before the stage creates it
        try:
            stage.write(out.path, image, out.mode)
        except OSError as exc:
            raise LabError(f"{exc.filename or out.path.parent}: cannot write the seeds: "
                           f"{exc.strerror or exc}; free some space or fix the directory's "
                           "permissions and rerun") from None
        stage.remove(_elsewhere(ctx.ws, out.path))
        shown = _shown(ctx.ws, out.path)
        return Built(f"{shown}, secret: holds certs/ material, not in the manifest"
                     if seed.secret else shown,
                     meta={"host": seed.host, "instance_id": seed.instance_id,
                           "marker": seed.marker, "format": fmt, "files": list(seed.files)},
                     tools={"pycdlib": tool} if fmt == "iso" else {},
                     sha256=hashlib.sha256(image).hexdigest())

    def ready(self, lab: Lab, ws: Workspace) -> str | None:
        """For a left-out step: every host has a seed, ISO or vfat, present and
        intact in its ledger (the manifest, or certs/seed/'s)."""
        try:
            declared = {fmt: self.outputs(lab, ws, fmt=fmt) for fmt in FORMATS}
        except LabError as exc:
            return str(exc)
        missing = [iso.data[0].host for iso, vfat in zip(declared["iso"], declared["vfat"])
                   if not any(_intact(ws, out) for out in (iso, vfat))]
        return f"there is no seed for {', '.join(missing)}" if missing else None


def _intact(ws: Workspace, out: Output) -> bool:
    ledger = ledger_for(ws, out)
    rec = ledger.get(out.path) if ledger.path.exists() else None
    return rec is not None and ledger.intact(out.path, rec)


SEEDS = Seeds()


def build_seed_isos(lab: Lab, ws: Workspace, *, hosts: Iterable[str] | None = None,
                    force: bool = False, fmt: str = "iso") -> list[Outcome]:
    """Build the seed of each host (default: all hosts, in lab order); see :class:`Seeds`."""
    return run(SEEDS, lab, ws, force=force, hosts=hosts, fmt=fmt)
