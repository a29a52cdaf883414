"""The shared pieces: manifest, atomic writes, the runner, the build lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from builders.core.errors import LabError
from builders.core.fsutil import atomic_path, atomic_write, sha256_file
from builders.core.manifest import Manifest, input_digest
from builders.core.extcmd import run
from builders.core.workspace import BuildLock, Workspace


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_sets_mode(tmp_path):
    p = atomic_write(tmp_path / "secret", "x", mode=0o600)
    assert p.stat().st_mode & 0o777 == 0o600


def test_input_digest_is_stable_and_content_sensitive(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a")
    d1 = input_digest({"b": 1, "a": [1, 2]}, f)
    assert d1 == input_digest({"a": [1, 2], "b": 1}, f)
    f.write_text("b")
    assert d1 != input_digest({"a": [1, 2], "b": 1}, f)


def test_manifest_record_and_currency(tmp_path):
    m = Manifest(tmp_path)
    art = tmp_path / "images" / "x.qcow2"
    art.parent.mkdir()
    art.write_bytes(b"data")
    rec = m.record(art, "image", "d1", tools={"qemu-img": "7.2"}, meta={"virtual_size": 1})
    assert rec["sha256"] == sha256_file(art) and rec["path"] == "images/x.qcow2"
    assert m.is_current(art, "d1") and not m.is_current(art, "d2")
    art.write_bytes(b"tampered")
    assert not m.is_current(art, "d1")
    assert m.verify() == [("images/x.qcow2", "size 8 != recorded 4")]
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert set(data["artifacts"]["images/x.qcow2"]) >= {
        "kind", "path", "sha256", "size", "input_digest", "created", "tools"}


def test_manifest_find_by_name(tmp_path):
    m = Manifest(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "debian-12.qcow2").write_bytes(b"q")
    m.record(tmp_path / "images" / "debian-12.qcow2", "base-image", "d")
    path, rec = m.find("debian-12")
    assert path == tmp_path / "images" / "debian-12.qcow2" and rec["kind"] == "base-image"
    with pytest.raises(LabError, match="no artifact of that name"):
        m.find("ubuntu-24.04")


def test_runner_failure_is_a_user_error_with_the_tools_last_line():
    with pytest.raises(LabError) as err:
        run([sys.executable, "-c", "import sys; print('boom: bad thing', file=sys.stderr); sys.exit(3)"])
    assert "failed with exit status 3: boom: bad thing" in str(err.value)


def test_runner_masks_secrets_in_errors():
    with pytest.raises(LabError) as err:
        run([sys.executable, "-c", "import sys; print('pw=hunter2', file=sys.stderr); sys.exit(1)",
             "hunter2"], secrets=["hunter2"])
    assert "hunter2" not in " ".join(err.value.lines())


def test_runner_missing_tool_says_what_to_install():
    with pytest.raises(LabError, match="not found on PATH; install it"):
        run(["labforge-no-such-tool"])


def test_build_lock_refuses_a_second_run(tmp_path):
    from builders.core.workspace import Workspace
    ws = Workspace(tmp_path)
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from builders.core.workspace import BuildLock, Workspace
        from pathlib import Path
        with BuildLock(Workspace(Path({str(tmp_path)!r}))):
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LabError, match=rf"another build is running \(pid {holder.pid}\)"):
            with BuildLock(ws):
                pass
    finally:
        holder.kill()
        holder.wait()
    with BuildLock(ws):  # released by the kernel when the holder died
        pass


def test_build_lock_is_reentrant_within_a_process(tmp_path):
    from builders.core.workspace import Workspace
    ws = Workspace(tmp_path)
    with BuildLock(ws):
        with BuildLock(ws):  # a builder called by `invoke all` takes it again
            pass
        with BuildLock(ws):
            pass


# ---- tasks.py: `invoke --list` reads well ----------------------------------
def _collection():
    import importlib.util

    from invoke import Collection

    from helpers import ROOT
    spec = importlib.util.spec_from_file_location("labforge_tasks", ROOT / "tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Collection.from_module(mod)


def test_every_task_has_a_one_line_docstring_and_every_option_help(cli):
    ns = _collection()
    assert {"certs", "certs-check", "seed-iso", "check-lab"} <= set(ns.tasks)
    listing = " ".join(cli("--list", check=True).stdout.split())
    for name, t in sorted(ns.tasks.items()):
        doc = (t.__doc__ or "").strip()
        summary = doc.split("\n\n")[0]
        assert summary and "\n" not in summary, f"{name}: docstring needs a one-line summary"
        assert summary.endswith("."), f"{name}: {summary!r}"
        assert f"{name} {summary}" in listing, f"{name}: not listed with its summary"
        missing = [a.name for a in t.get_arguments() if not (a.help or "").strip()]
        assert not missing, f"{name}: options without help text: {missing}"


def test_build_lock_removes_what_a_killed_run_left(tmp_path):
    """Temporary outputs (.NAME.XXXX.part files, .NAME.XXXX.part/.dib dirs)
    of a run that died under kill -9 are garbage once a new run holds the
    lock; cache/ (resumable downloads) and real outputs are left alone."""
    ws = Workspace(tmp_path / "ws")
    stale = [ws.artifact_dir("images") / ".debian-12.qcow2.ab12cd.part",
             ws.artifact_dir("boxes") / ".labforge-debian-12-1.0.0.box.x1y2.part",
             ws.certs_dir("kafka") / ".ca.key.q9w8.part",
             ws.artifacts / ".manifest.json.zz11.part"]
    for p in stale:
        p.write_bytes(b"half")
    dirs = [ws.artifact_dir("images", ".amphora-x64-haproxy.k3j4.part"),
            ws.artifact_dir("images", ".debian-12.qcow2.m5n6.dib")]
    for d in dirs:
        (d / "sub").mkdir()
        (d / "sub" / "img").write_bytes(b"x")
    keep = [ws.cache_dir("downloads", "debian-12") / "debian-12-genericcloud-amd64.qcow2.part",
            ws.artifact_dir("images") / "debian-12.qcow2",
            ws.artifact_dir("seed") / "broker1.iso"]
    for p in keep:
        p.write_bytes(b"keep")
    with BuildLock(ws):
        pass
    assert [p for p in stale + dirs if p.exists()] == []
    assert all(p.read_bytes() == b"keep" for p in keep)


# ---- the labforge command: a plain task call skips Invoke's start-up --------
# (command line, what Invoke's parser makes of it) for lines the direct path takes
_DIRECT = [
    (["certs"], {}),
    (["certs", "--lab", "x.yaml", "--force", "--rotate", "kafka", "--rotate=ssh"],
     {"lab": "x.yaml", "force": True, "rotate": ["kafka", "ssh"]}),
    (["seed-iso", "--host=h1", "--host", "h2", "--format", "vfat"],
     {"host": ["h1", "h2"], "format": "vfat"}),
    (["lab-check", "--wait", "30", "--json"], {"wait": 30, "json": True}),
    (["all", "--only", "certs", "--skip=amphora"], {"only": ["certs"], "skip": ["amphora"]}),
    (["publish-amphora", "--deactivate-old", "--min-ram", "2048"],
     {"deactivate_old": True, "min_ram": "2048"}),
]
# lines left to Invoke: its parser has the last word on everything else
_TO_INVOKE = [[], ["--list"], ["certs", "--help"], ["certs", "-f"], ["certs", "seed-iso"],
              ["certs", "--bogus"], ["certs", "--force=yes"], ["certs", "--lab"],
              ["certs-check", "--warn_days", "5"],
              ["certs", "--lab", "--force"], ["lab-check", "--wait", "soon"],
              ["glance-upload", "disk.qcow2"], ["certs", "--lab", "a", "--lab", "b"], ["nosuch"]]


@pytest.mark.parametrize("argv,expected", _DIRECT)
def test_a_plain_task_call_is_read_as_invokes_parser_reads_it(argv, expected):
    from invoke.parser import Parser

    from builders import cli
    fn, kwargs = cli._direct_call(argv)
    assert kwargs == expected
    parsed = Parser(contexts=cli.ns.to_contexts()).parse_argv(argv)[0]
    assert fn is cli.ns.tasks[parsed.name].body
    given = {name: arg.value for name, arg in parsed.args.items() if arg.got_value}
    assert given == {n.replace("_", "-"): v for n, v in kwargs.items()}


def test_the_direct_path_knows_every_task_by_invokes_name_for_it():
    from builders import cli
    assert set(cli._TASKS) == set(cli.ns.tasks)


@pytest.mark.parametrize("argv", _TO_INVOKE)
def test_anything_else_goes_to_invoke(argv):
    from builders import cli
    assert cli._direct_call(argv) is None


def test_labforge_runs_a_task_without_importing_invoke(tmp_path):
    """`labforge certs --lab FILE` (what CI jobs type) does its work and
    fails with its one line without loading Invoke; `--list` still has it."""
    code = ("import sys; from builders.cli import main\n"
            "try:\n    main(['labforge', *sys.argv[1:]])\n"
            "finally:\n    print('invoke' in sys.modules)")
    def labforge(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=dict(os.environ, LABFORGE_WORKDIR=str(tmp_path)))
    ok = labforge("check-lab")
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "False", ok
    bad = labforge("certs", "--lab", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 1 and bad.stdout.strip() == "False", bad
    assert bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1, bad.stderr
    listed = labforge("--list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[-1] == "True", listed
    assert "seed-iso" in listed.stdout
