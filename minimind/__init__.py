"""MiniMind: train small language models from nothing, and see every line of it."""

__version__ = "0.1.0"

import time as _time

_clock_start = _time.monotonic()


def restart_clock() -> None:
    """Start the command's clock (the `minimind` entry point does, first thing): `--max-time` budgets and
    the `elapsed_s` that runs log count from here."""
    global _clock_start
    _clock_start = _time.monotonic()


def seconds_since_start() -> float:
    """Seconds since the command started (since `minimind` was imported when no command restarted it)."""
    return _time.monotonic() - _clock_start
