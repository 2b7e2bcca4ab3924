"""What every benchmark prints about where it ran: the commit, the CPU and the load."""

from __future__ import annotations

import os
import platform
import subprocess


def commit() -> str:
    """The checkout's short commit, with ``+changes`` when the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, check=False).returncode
    except OSError:
        return "?"
    return (head or "?") + (" +changes" if head and dirty == 1 else "")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the platform's name elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_1min() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def load_averages() -> str:
    """The 1-, 5- and 15-minute load averages as text."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
