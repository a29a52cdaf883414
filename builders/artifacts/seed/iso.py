"""The seed as an ISO 9660 volume labelled ``cidata``, written with pycdlib in
this process (no external binaries): the seed files at its root with Rock
Ridge and Joliet names, as ``genisoimage -volid cidata -joliet -rock`` makes
it.  Timestamps come from the epoch given (SOURCE_DATE_EPOCH or a fixed
date) and files are in a fixed order, so the same files give the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from builders.artifacts.seed.rendering import ORDER, VOLUME_ID

# ISO 9660 (level 2) identifiers of the seed files; Rock Ridge / Joliet carry the real names
ISO_NAMES = {
    "meta-data": "META_DATA.;1",
    "network-config": "NETWORK_CONFIG.;1",
    "user-data": "USER_DATA.;1",
    "vendor-data": "VENDOR_DATA.;1",
}


class _FrozenClock:
    """Stands in for the ``time`` module inside pycdlib while a seed is built:
    ``time()`` is the fixed epoch and local time is UTC.  pycdlib reads the
    clock for the volume descriptor dates (creation, modification, effective,
    and the modification date again when it writes), every directory record
    date and every Rock Ridge TF entry; Joliet's descriptor and records use the
    same calls.  There is no API to pass a date in, hence this."""

    def __init__(self, epoch: int):
        self._epoch = float(epoch)

    def time(self) -> float:
        return self._epoch

    def localtime(self, secs: float | None = None) -> time.struct_time:
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_clock_lock = threading.Lock()


@contextlib.contextmanager
def _frozen_clock(epoch: int) -> Iterator[None]:
    import pycdlib  # noqa: F401  (load its submodules)
    mods = [m for n, m in list(sys.modules.items())
            if n.startswith("pycdlib.") and getattr(m, "time", None) is time]
    with _clock_lock:
        clock = _FrozenClock(epoch)
        for m in mods:
            m.time = clock
        try:
            yield
        finally:
            for m in mods:
                m.time = time


def make_iso(files: dict[str, bytes], epoch: int) -> bytes:
    """The ISO 9660 image (Rock Ridge 1.09 + Joliet, volume id cidata) of ``files``."""
    import pycdlib
    with _frozen_clock(epoch):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=2, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID,
                sys_ident="LINUX", app_ident_str="LABFORGE SEED-ISO (PYCDLIB)")
        for name in ORDER:
            if name not in files:
                continue
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), "/" + ISO_NAMES[name],
                       rr_name=name, joliet_path="/" + name, file_mode=0o100444)
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def pycdlib_version() -> str:
    """pycdlib's version, from the one dist-info (or egg-info) beside the
    package: importing importlib.metadata would cost more than building a
    seed (about 15 ms of every `seed-iso`, up to date or not)."""
    import importlib.util
    spec = importlib.util.find_spec("pycdlib")
    if spec and spec.origin:
        infos = list(Path(spec.origin).parent.parent.glob("pycdlib-*.*-info"))
        if len(infos) == 1:    # pycdlib-1.14.0.dist-info, pycdlib-1.11.0-py3.11.egg-info
            return infos[0].name[len("pycdlib-"):].rsplit(".", 1)[0].split("-")[0]
    from importlib.metadata import version
    return version("pycdlib")


def read_seed(path: Path) -> dict[str, bytes]:
    """The files on a seed ISO by their Rock Ridge names (for checks and tests)."""
    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()
