"""This process's memory as /proc/self/status reports it, for the benchmarks that measure each side
in a fresh process: the resident set now (VmRSS; taken after the imports as the baseline) and its
high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries a parent's peak into the
ru_maxrss of a child it starts (fork, then exec), so a child of a process that has held a model
would report at least the parent's peak (measured: a child of a 1.5 GB process reported 1.5 GB)."""
from __future__ import annotations

from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_bytes() -> int:
    return _status_bytes("VmHWM")
