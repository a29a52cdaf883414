"""Messages and progress.

Progress shows as a bar on a terminal and as plain log lines (at most every
10 % or 15 s) when stderr is not a terminal, as in CI.  All human output
goes to stderr, so ``--json`` documents on stdout stay clean.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

log = logging.getLogger("labforge")


def setup_logging(verbose: bool = False) -> None:
    if getattr(setup_logging, "done", False):
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    setup_logging.done = True  # type: ignore[attr-defined]


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``advance(n)`` as work is done; ``total`` may be None (unknown)."""

    def __init__(self, label: str, total: float | None, unit: str = "B"):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0.0
        self.start = time.monotonic()
        self._last_log = self.start
        self._last_pct = -10
        self._bar = None
        self._task = None

    def _fmt(self, n: float) -> str:
        if self.unit != "B":
            return f"{n:.0f} {self.unit}"
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(n) < 1024 or u == "GiB":
                return f"{n:.1f} {u}" if u != "B" else f"{n:.0f} B"
            n /= 1024
        return str(n)  # pragma: no cover

    def advance(self, n: float) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        pct = int(self.done * 100 / self.total) if self.total else None
        if (pct is not None and pct >= self._last_pct + 10) or now - self._last_log >= 15:
            self._last_log = now
            if pct is not None:
                self._last_pct = pct - pct % 10
                log.info("%s: %d%% (%s of %s)", self.label, pct, self._fmt(self.done), self._fmt(self.total))
            else:
                log.info("%s: %s, %.0fs", self.label, self._fmt(self.done), now - self.start)

    def set_description(self, text: str) -> None:
        """Show what is happening now (a build phase)."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {text}")
        else:
            log.info("%s: %s (%.0fs)", self.label, text, time.monotonic() - self.start)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


@contextlib.contextmanager
def progress(label: str, total: float | None = None, unit: str = "B") -> Iterator[Progress]:
    p = Progress(label, total, unit)
    if is_tty():
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                   TextColumn, TimeElapsedColumn, TransferSpeedColumn)
        cols = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        if unit == "B":
            cols[2:2] = [DownloadColumn(), TransferSpeedColumn()]
        from rich.console import Console
        # rich's default console is stdout: bars go where every human line goes
        with RichProgress(*cols, transient=True, console=Console(stderr=True)) as bar:
            p._bar = bar
            p._task = bar.add_task(label, total=total)
            yield p
    else:
        yield p
