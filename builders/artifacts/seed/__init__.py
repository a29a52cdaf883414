"""cloud-init NoCloud seeds: one volume labelled ``cidata`` per host.

The package reads top to bottom:

- ``validate``: checks of what goes on a seed (files a host names,
  write_files sources, SSH keys, generated cloud-config, size), and whether
  a seed is secret;
- ``rendering``: meta-data / user-data / network-config from lab.yaml;
- ``iso`` (ISO 9660 via pycdlib) and ``vfat`` (FAT12): the volume formats;
- this module: the builder (``invoke seed-iso``), where each seed goes, and
  the batched, atomic write of every seed.

Seeds are reproducible: timestamps come from ``SOURCE_DATE_EPOCH`` (or a
fixed date), files are in a fixed order, so the same inputs give the same
bytes.  A seed that carries material from certs/ (a ``write_files[].source``
of ``"certs:..."`` or any path that resolves under certs/, or a user-data /
vendor-data / network-config file there) is secret: it is written to
``certs/seed/<host>.iso`` (0600) and kept out of the manifest.  See
docs/seed-iso.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from builders.artifacts.seed.iso import make_iso, pycdlib_version, read_seed
from builders.artifacts.seed.rendering import (GENERATOR, VOLUME_ID, Seed, dump_yaml, host_of,
                                               network_config, render)
from builders.artifacts.seed.validate import (CERTS_PREFIX, MAX_SEED_BYTES, check_cloud_config,
                                              is_secret, validate_network_config,
                                              validate_user_data)
from builders.artifacts.seed.vfat import make_vfat as _fat12
from builders.core.errors import LabError
from builders.core.fsutil import atomic_write, fsync_dir, sha256_file
from builders.core.lab import Host, Lab
from builders.core.manifest import Manifest, input_digest
from builders.core.outcome import Outcome
from builders.core.workspace import BuildLock, Workspace

__all__ = [
    "KIND", "KIND_VFAT", "FORMATS", "DEFAULT_EPOCH", "GENERATOR", "VOLUME_ID", "MAX_SEED_BYTES",
    "CERTS_PREFIX", "Seed", "render", "dump_yaml", "network_config", "is_secret",
    "validate_user_data", "validate_network_config", "check_cloud_config", "make_iso",
    "make_vfat", "read_seed", "seed_path", "seed_marker", "source_date_epoch", "build_seed_isos",
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
    built in (default: ``Workspace.default()``, as the CLI uses).
    """
    return render(lab, ws or Workspace.default(), host).marker


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
# building
# --------------------------------------------------------------------------
def _state_path(ws: Workspace) -> Path:
    return ws.certs / "seed" / "state.json"


def _load_state(ws: Workspace) -> dict:
    try:
        data = json.loads(_state_path(ws).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _save_state(ws: Workspace, state: dict) -> None:
    ws.certs_dir("seed")
    atomic_write(_state_path(ws), json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)


def build_seed_isos(lab: Lab, ws: Workspace, *, hosts: Iterable[str] | None = None,
                    force: bool = False, fmt: str = "iso") -> list[Outcome]:
    """Build the seed of each host (default: all hosts, in lab order).

    Every seed is rendered and validated first: a bad input anywhere stops
    the run before any file is written.  Public seeds go to
    artifacts/seed/<host>.iso and the manifest; secret ones (carrying
    certs/ material) to certs/seed/<host>.iso, 0600, recorded only in
    certs/seed/state.json.
    """
    if fmt not in FORMATS:
        raise LabError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    names = list(dict.fromkeys(hosts)) if hosts else [h.name for h in lab.hosts]
    chosen = [lab.host(n) for n in names]
    if not chosen:
        raise LabError(f"{lab.source.name}: hosts: the lab has no hosts; nothing to seed")
    epoch = source_date_epoch()
    tool = pycdlib_version()
    seeds = [render(lab, ws, h) for h in chosen]
    kind = KIND if fmt == "iso" else KIND_VFAT
    outcomes: list[Outcome] = []
    with BuildLock(ws):
        manifest = Manifest(ws.artifacts)
        entries = manifest.entries()
        state = _load_state(ws)
        state_changed = False
        pending: list[tuple[Path, bytes, int]] = []
        records: list[dict] = []
        for h, seed in zip(chosen, seeds):
            start = time.monotonic()
            path = seed_path(lab, ws, h, fmt=fmt)
            digest = input_digest(KIND, fmt, seed.files, epoch, tool)
            step = f"seed-iso {h.name}" if fmt == "iso" else f"seed-vfat {h.name}"
            state_changed |= _drop_other_location(ws, path, manifest, entries, state)
            if seed.secret:
                current = _secret_current(state, path, digest)
            else:
                current = _public_current(manifest, entries, path, digest)
            shown = _shown(ws, path)
            if current and not force:
                outcomes.append(Outcome(step, "up to date", [path], shown))
                continue
            image = make_iso(seed.files, epoch) if fmt == "iso" else make_vfat(seed.files, epoch)
            sha = hashlib.sha256(image).hexdigest()
            if seed.secret:
                ws.certs_dir("seed")
                pending.append((path, image, 0o600))
                state[path.name] = {"input_digest": digest, "sha256": sha, "size": len(image),
                                    "instance_id": seed.instance_id, "host": h.name,
                                    "marker": seed.marker, "format": fmt}
                state_changed = True
                detail = f"{shown}, secret: holds certs/ material, not in the manifest"
            else:
                pending.append((path, image, 0o644))
                records.append(dict(path=path, kind=kind, digest=digest, sha256=sha,
                                    tools={"pycdlib": tool} if fmt == "iso" else {},
                                    meta={"host": h.name, "instance_id": seed.instance_id,
                                          "marker": seed.marker, "format": fmt,
                                          "files": list(seed.files)}))
                detail = shown
            outcomes.append(Outcome(step, "built", [path], detail,
                                    seconds=time.monotonic() - start))
        try:
            _write_all(pending)
        except OSError as exc:
            where = exc.filename or (pending[0][0].parent if pending else ws.artifacts)
            raise LabError(f"{where}: cannot write the seeds: {exc.strerror or exc}; free some "
                           "space or fix the directory's permissions and rerun") from None
        if records:
            manifest.record_many(records)
        if state_changed:
            _save_state(ws, state)
    return outcomes


def _public_current(manifest: Manifest, entries: dict, path: Path, digest: str) -> bool:
    rec = entries.get(manifest.rel(path))
    if rec is None or rec.get("input_digest") != digest:
        return False
    return manifest.intact(path, rec)


def _secret_current(state: dict, path: Path, digest: str) -> bool:
    rec = state.get(path.name)
    if not rec or rec.get("input_digest") != digest or not path.is_file():
        return False
    return path.stat().st_size == rec.get("size") and sha256_file(path) == rec.get("sha256")


def _write_all(outputs: list[tuple[Path, bytes, int]]) -> None:
    """Write every image atomically: temporary file, fsync, rename, then one
    directory fsync per directory.  The fsyncs run in parallel threads, so
    the file system commits them together instead of one journal commit
    per seed.  On a failure the temporary files left are removed; a seed
    renamed into place before it is not yet in the manifest or state file,
    so the next run rebuilds it."""
    from concurrent.futures import ThreadPoolExecutor

    tmps: list[tuple[Path, Path, int]] = []
    try:
        for target, data, mode in outputs:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                       dir=target.parent)
            tmps.append((Path(tmp), target, fd))
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        if len(tmps) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(tmps))) as pool:
                list(pool.map(os.fsync, [fd for _, _, fd in tmps]))
        else:
            for _, _, fd in tmps:
                os.fsync(fd)
        for i, (tmp, target, fd) in enumerate(tmps):
            os.close(fd)
            tmps[i] = (tmp, target, -1)
        for tmp, target, _ in tmps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _, fd in tmps:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    for d in sorted({target.parent for _, target, _ in tmps}):
        fsync_dir(d)


def _shown(ws: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _drop_other_location(ws: Workspace, path: Path, manifest: Manifest, entries: dict,
                         state: dict) -> bool:
    """A seed that moved between artifacts/ and certs/ (a certs: source was
    added or removed) must not leave its old copy behind: a stale public
    seed would be published, a stale secret one would linger.  Returns True
    when ``state`` changed."""
    public = ws.artifacts / "seed" / path.name
    secret = ws.certs / "seed" / path.name
    if path == secret and public.exists():
        public.unlink()
        if manifest.rel(public) in entries:
            manifest.remove(public)
    elif path == public and secret.exists():
        secret.unlink()
        return state.pop(path.name, None) is not None
    return False

