"""Was the machine idle while a benchmark ran?

The load average cannot answer that after the fact: a benchmark's own work
raises it (a CPU-bound amphora build ends with a load near the number of
CPUs on an otherwise idle machine).  Instead the machine's CPU use is
sampled from /proc/stat in short quiet windows in which the benchmark
itself does nothing: before it starts and between its rounds.  Whatever
is busy then is someone else.  If any window shows more than IDLE_BUSY of
the CPUs in use, the figures are labelled "loaded", and a loaded figure
does not count as meeting a target.  The load average before and after is
recorded as well, for the record.
"""

from __future__ import annotations

import os
import resource
import time

IDLE_BUSY = 0.10        # share of all CPUs others may use in a quiet window, still "idle"
QUIET_S = 1.0           # length of one quiet window


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_seconds(*who: int) -> float:
    """User + system CPU seconds used so far by ``who`` (resource.RUSAGE_SELF,
    resource.RUSAGE_CHILDREN): the difference around a run is its CPU time,
    which shows the work itself when wall times swing with the load."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


def load_per_cpu() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


class Conditions:
    """Quiet windows of one benchmark run; :meth:`quiet` between rounds."""

    def __init__(self) -> None:
        self.load_before = load_per_cpu()
        self.load_after: float | None = None
        self.windows: list[float] = []
        self.quiet()

    def quiet(self, seconds: float = QUIET_S) -> float:
        """Sleep ``seconds`` and record the share of the CPUs others used."""
        b0, t0 = _cpu_ticks()
        time.sleep(seconds)
        b1, t1 = _cpu_ticks()
        share = (b1 - b0) / max(1, t1 - t0)
        self.windows.append(round(share, 3))
        return share

    @property
    def label(self) -> str:
        return "idle" if max(self.windows) <= IDLE_BUSY else "loaded"

    def finish(self) -> dict:
        """One last quiet window; the conditions as recorded in the JSON."""
        self.quiet()
        self.load_after = load_per_cpu()
        return {"condition": self.label, "others_busy_max": max(self.windows),
                "quiet_windows": len(self.windows), "quiet_window_s": QUIET_S,
                "idle_threshold_busy": IDLE_BUSY, "cpus": os.cpu_count(),
                "load_per_cpu_before": round(self.load_before, 2),
                "load_per_cpu_after": round(self.load_after, 2)}

    def describe(self) -> str:
        """One line for the report: the label and what it rests on."""
        after = f"{self.load_after:.2f}" if self.load_after is not None else "-"
        return (f"{self.label}: others used at most {max(self.windows):.0%} of "
                f"{os.cpu_count()} CPUs in {len(self.windows)} quiet windows of {QUIET_S:g} s "
                f"(load per CPU {self.load_before:.2f} before, {after} after)")

    def warn(self) -> None:
        if self.label == "loaded":
            print("loaded machine: these figures do not count as meeting a target")
