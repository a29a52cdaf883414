"""Trust checks that are not one CLI fault each: the run dependencies need no
compiler, a keystore needs no twofish, progress goes to stderr, certs/ is
never left open, the lab's output names and file-valued keys are checked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builders.core import lab as labmod
from builders.core.errors import LabError
from conftest import ROOT


# --------------------------------------------------------------------------
# setup.sh: no compiler needed
# --------------------------------------------------------------------------
def test_run_dependencies_do_not_pull_twofish():
    """pyjks requires twofish (a C extension, no wheel); setup.sh installs pyjks
    with --no-deps, so the declared dependencies must not bring it back."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    assert "pyjks" not in names and "twofish" not in names
    nodeps = (ROOT / "scripts" / "requirements-nodeps.txt").read_text()
    assert "pyjks" in nodeps
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--no-deps -r scripts/requirements-nodeps.txt" in setup


@pytest.mark.integration
def test_jks_keystore_without_twofish(tmp_path):
    """A JKS keystore with a private key (Sun's password-based protector, not
    twofish) is written and read back with twofish impossible to import, and
    keytool opens it with the password."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["twofish"] = None          # importing it now fails
        from builders.tools import pki
        ca_key = pki.new_key("rsa", 2048)
        ca = pki.new_ca(ca_key, pki.name("test CA"), 30)
        key = pki.new_key("rsa", 2048)
        cert = pki.issue(ca, ca_key, key, pki.name("broker1"), 30, sans=["broker1"])
        data = pki.jks_keystore("broker1", key, cert, [ca], "secret-pw-1")
        assert pki.jks_password_opens(data, "secret-pw-1")
        assert not pki.jks_password_opens(data, "wrong-pw-22")
        open({str(tmp_path / "k.jks")!r}, "wb").write(data)
        assert "twofish" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    (tmp_path / "pw").write_text("secret-pw-1\n")
    out = subprocess.run(["keytool", "-list", "-v", "-keystore", str(tmp_path / "k.jks"),
                          "-storepass:file", str(tmp_path / "pw")],
                         capture_output=True, text=True, check=True).stdout
    assert "Entry type: PrivateKeyEntry" in out and "Certificate chain length: 2" in out
