"""`pip install .` gives a working `labforge` command, used outside the checkout.

The project is installed (not editable, with its real dependencies from the
package index) into a fresh virtualenv, then run from a temp directory that
has nothing to do with the checkout: the embedded lab and dockerfiles/ must
come from the installed package, and outputs land beside the lab file, in
LABFORGE_WORKDIR, or (for the embedded lab) in the current directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INVOKE, ROOT, assert_one_line_error, lab_file

pytestmark = pytest.mark.integration

# the outputs, caches and virtualenvs of a working checkout (top level), and byte code
_NOT_SOURCE_TOP = {".git", "artifacts", "certs", "cache", "build", "dist", ".pytest_cache"}


def _not_source(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
            or (top and (n in _NOT_SOURCE_TOP or n.startswith(".venv")))}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with `pip install SRC` of a copy of the source tree
    (a copy, so the build's build/ and egg-info never land in the checkout)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_not_source, symlinks=True)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, env=_clean_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(src)                   # the command must not need the source tree
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LABFORGE_WORKDIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


@pytest.fixture
def labforge(venv, tmp_path):
    """Run the installed `labforge` in ``cwd`` (default: an empty temp dir)."""
    home = tmp_path / "elsewhere"
    home.mkdir()

    def run(*args: str, cwd: Path = home, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "labforge"), *args], cwd=cwd,
                              capture_output=True, text=True, env=_clean_env(**env), timeout=600)
    run.home = home
    return run


@pytest.fixture
def small_lab(tmp_path) -> Path:
    """The default lab with Octavia off, in its own directory."""
    return lab_file(tmp_path / "mylab", **{"octavia.enabled": False})


def test_installed_package_carries_its_resources(venv):
    """The embedded lab, dockerfiles/ (executables still executable) and the
    schemas are found inside the installed package, not in a checkout."""
    code = ("from builders.core import resources as r; import builders.tools.dib as d;"
            "print(r.checkout_dir()); print(r.default_lab()); print(r.dockerfiles());"
            "print(r.schema('run.schema.json')); print(d.STANDIN_DIR)")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, cwd=venv, env=_clean_env(), check=True)
    checkout, lab, dockerfiles, schema, standins = proc.stdout.split("\n")[:5]
    assert checkout == "None"
    site = Path(lab).parents[2]
    assert site.name == "site-packages" and str(site).startswith(str(venv))
    assert Path(lab).is_file() and Path(schema).is_file()
    assert (Path(dockerfiles) / "amphora" / "Dockerfile").is_file()
    for tool in ("kpartx", "dmsetup", "sudo"):
        assert os.access(Path(standins) / tool, os.X_OK), tool
    element = Path(dockerfiles) / "amphora" / "elements" / "labforge-debian"
    assert os.access(next((element / "extra-data.d").iterdir()), os.X_OK)


def test_labforge_lists_the_invoke_tasks(labforge):
    proc = labforge("--list")
    assert proc.returncode == 0, proc.stderr
    invoke = subprocess.run([*INVOKE, "--list"],
                            capture_output=True, text=True, check=True)
    names = lambda out: {ln.split()[0] for ln in out.splitlines()  # noqa: E731
                         if ln.startswith("  ") and ln.split()}
    assert names(proc.stdout) == names(invoke.stdout)
    assert {"all", "check-lab", "certs", "seed-iso", "build-amphora"} <= names(proc.stdout)
    assert labforge("--version").stdout.startswith("labforge ")


def test_labforge_checks_a_lab_and_the_embedded_one(labforge, small_lab):
    proc = labforge("check-lab", "--lab", str(small_lab))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{small_lab}: ok: lab kafka-lab, 3 hosts")
    embedded = labforge("check-lab")
    assert embedded.returncode == 0, embedded.stderr
    assert "site-packages" in embedded.stdout.splitlines()[0]
    bad = small_lab.with_name("bad.yaml")
    bad.write_text(small_lab.read_text().replace("10.100.0.12", "10.200.0.12"))
    assert_one_line_error(labforge("check-lab", "--lab", str(bad)),
                          "hosts.broker2.nics[1].ip: 10.200.0.12 is not in network private")


def test_labforge_all_writes_beside_the_lab_file(labforge, small_lab):
    proc = labforge("all", "--lab", str(small_lab), "--only", "certs", "--only", "seed-iso")
    assert proc.returncode == 0, proc.stderr
    beside = small_lab.parent
    assert (beside / "certs" / "kafka" / "ca.crt").is_file()
    assert (beside / "certs" / "seed" / "broker1.iso").is_file()
    # the brokers' seeds are secret (they ship keystores): nothing to publish
    assert not (beside / "artifacts" / "seed").exists()
    assert not (beside / "certs" / "octavia").exists()
    assert sorted(p.name for p in labforge.home.iterdir()) == []    # nothing in the cwd
    again = labforge("all", "--lab", str(small_lab), "--only", "certs", "--only", "seed-iso")
    assert "certs: up to date" in again.stderr and "seed-iso: up to date" in again.stderr
    assert labforge("verify", "--lab", str(small_lab)).returncode == 0


def test_labforge_workdir_wins(labforge, small_lab, tmp_path):
    work = tmp_path / "work"
    proc = labforge("all", "--lab", str(small_lab), "--only", "certs", "--only", "seed-iso",
                    LABFORGE_WORKDIR=str(work))
    assert proc.returncode == 0, proc.stderr
    assert (work / "certs" / "kafka" / "ca.crt").is_file()
    assert (work / "certs" / "seed" / "broker1.iso").is_file()
    assert sorted(p.name for p in small_lab.parent.iterdir()) == ["lab.yaml"]


def test_embedded_lab_of_an_installed_copy_builds_in_the_current_directory(labforge, venv):
    proc = labforge("seed-iso", "--host", "broker1")      # a seed needs the lab's SSH key ...
    assert_one_line_error(proc, "no SSH key")
    proc = labforge("certs")                              # ... which `certs` makes, here
    assert proc.returncode == 0, proc.stderr
    assert (labforge.home / "certs" / "ssh").is_dir()
    assert labforge("seed-iso", "--host", "broker1").returncode == 0
    assert (labforge.home / "certs" / "seed" / "broker1.iso").is_file()
    [data] = venv.glob("lib/python*/site-packages/builders/_data")
    assert sorted(p.name for p in data.iterdir()) == ["dockerfiles", "lab.yaml"]
