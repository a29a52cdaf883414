"""The one error type a user sees.

Every failure a user can cause (bad lab.yaml, missing tool, wrong checksum, a
service refusing) raises :class:`LabError` with a one-line message that names
the file, field or command and says what to do.  ``tasks.py`` turns it into
that line on stderr and exit status 1; anything else escaping is a bug.
"""

from __future__ import annotations


class LabError(Exception):
    """A problem the user can fix; ``str(err)`` is the line to show them.

    ``details`` holds extra lines (for example every problem found in a
    lab.yaml, or the last lines a failing tool printed); they are shown after
    the first line.
    """

    def __init__(self, message: str, details: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.details = tuple(details)

    def __str__(self) -> str:
        return self.message

    def lines(self) -> list[str]:
        return [self.message, *self.details]
