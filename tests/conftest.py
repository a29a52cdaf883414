"""Shared fixtures: an isolated workspace, the default lab, and the CLI.

Helper functions (ROOT, sh, make_qcow2, lab variants, snapshots, the
one-line error assertion) are in helpers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builders.core import lab as labmod
from builders.core.workspace import Workspace
from helpers import INVOKE, ROOT


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """An empty workspace (certs/, artifacts/, cache/) in a temp dir."""
    return Workspace(tmp_path / "ws")


@pytest.fixture
def default_lab() -> labmod.Lab:
    return labmod.load(ROOT / "lab.yaml")


@pytest.fixture
def cli(ws: Workspace):
    """Run `invoke ARGS...` as a user would, in the test's workspace."""
    def run(*args: str, env: dict | None = None, check: bool | None = None,
            timeout: float = 1800) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, LABFORGE_WORKDIR=str(ws.root))
        full_env.update(env or {})
        proc = subprocess.run([*INVOKE, *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout)
        if check is True:
            assert proc.returncode == 0, proc.stderr
        return proc
    return run


@pytest.fixture
def report(capsys):
    """Show a measurement in the test log, also when the test passes (CI logs
    keep the timings the docs quote; no test asserts a time)."""
    def show(text: str) -> None:
        with capsys.disabled():
            print(f"\n[measured] {text.strip()}")
    return show


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP image mirror on 127.0.0.1 (Range support, can drop a transfer once)."""
    from imagetools import Mirror
    root = tmp_path / "mirror"
    root.mkdir()
    srv = Mirror(root)
    yield srv
    srv.close()
