"""labforge's tasks for `invoke` in a checkout.

The tasks live in the package, in builders/cli.py, so that an installed
copy has them too: `pip install .` (or pipx) gives the `labforge` command
with the same tasks.  This file only hands their collection to Invoke:
`invoke --list` here is `labforge --list` anywhere.
"""

from builders.cli import ns  # noqa: F401 - Invoke loads the collection named ns
