"""Helpers shared by the certs tests: lab variants and certs/ snapshots."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from builders.core import lab as labmod

ROOT = Path(__file__).resolve().parent.parent


def default_dict() -> dict:
    return yaml.safe_load((ROOT / "lab.yaml").read_text())


def lab_from(data: dict, where: Path) -> labmod.Lab:
    """A Lab from a (modified) dict, as if read from ``where``/lab.yaml."""
    where.mkdir(parents=True, exist_ok=True)
    p = where / "lab.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return labmod.load(p)


def variant(where: Path, **changes) -> labmod.Lab:
    """The default lab with ``changes`` applied: keys are dotted paths."""
    data = copy.deepcopy(default_dict())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return lab_from(data, where)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``root``: content, mtime_ns, mode."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mtime_ns, st.st_mode & 0o7777)
    return out


def changed(before: dict, after: dict) -> set[str]:
    """Names of files added, removed or modified (content or mtime)."""
    names = set(before) | set(after)
    return {n for n in names if before.get(n) != after.get(n)}
