"""Packaging hook: ship the embedded lab and dockerfiles/ inside the package.

The checkout keeps ``lab.yaml`` and ``dockerfiles/`` at the top (the layout
users and docs refer to), outside the ``builders`` package.  An installed
copy needs them at run time, so the build copies them into the built
package as ``builders/_data/lab.yaml`` and ``builders/_data/dockerfiles/``,
keeping file modes (the diskimage-builder stand-ins and element scripts are
executables).  ``builders.core.resources`` finds them in either place.
Everything else is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
RESOURCES = ("lab.yaml", "dockerfiles")


class build_py_with_resources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:      # an editable install runs from the checkout itself
            return
        target = Path(self.build_lib) / "builders" / "_data"
        for name in RESOURCES:
            src = HERE / name
            paths = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for path in paths:
                if "__pycache__" in path.parts:
                    continue
                dest = target / path.relative_to(HERE)
                self.mkpath(str(dest.parent))
                self.copy_file(str(path), str(dest), preserve_mode=True)


setup(cmdclass={"build_py": build_py_with_resources})
