"""MiniMind: train small language models from nothing, and see every line of it."""

__version__ = "0.1.0"

import os as _os
import time as _time


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0, i.e. since minimind was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / _os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_clock_start = _time.monotonic() - _process_age()


def restart_clock(from_process_start: bool = False) -> None:
    """Start the command's clock: `--max-time` budgets and the `elapsed_s` that runs log count from
    here. The `minimind` program counts from its process's start (interpreter and imports included);
    a command run from Python code (`cli.main(argv)`, tests) from the call."""
    global _clock_start
    _clock_start = _time.monotonic() - (_process_age() if from_process_start else 0.0)


def seconds_since_start() -> float:
    """Seconds since the command started."""
    return _time.monotonic() - _clock_start
