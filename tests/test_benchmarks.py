"""The benchmark scripts load: a broken import in one shows here, not on
the idle machine hours later.  (What they measure is never asserted: no
test checks a time.)"""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_script_imports_what_it_uses():
    assert {"run_all.py", "bench_certs.py", "bench_seediso.py"} <= {p.name for p in SCRIPTS}
    # each script's top level as `python benchmarks/NAME.py` runs it (its own
    # directory first on sys.path), without calling main()
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "for path in sys.argv[1:]:\n"
            "    runpy.run_path(path, run_name='benchmark_import_check')\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, SCRIPTS)],
                          capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stderr
