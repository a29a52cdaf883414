"""What a build step reports: built, up to date, skipped (with why) or failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["built", "up to date", "skipped", "failed", "passed"]  # passed: checks


@dataclass
class Outcome:
    step: str                               # "certs", "seed-iso broker1", ...
    status: Status
    paths: list[Path] = field(default_factory=list)
    detail: str = ""                        # why skipped, what was built, ...
    seconds: float = 0.0

    def line(self) -> str:
        what = f" ({self.detail})" if self.detail else ""
        return f"{self.step}: {self.status}{what}"
