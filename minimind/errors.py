"""Errors a user can act on. The CLI prints them as `Name: message` with no traceback."""


class MiniMindError(Exception):
    """Base class: anything the user caused and can fix (bad data, bad flags, bad files)."""


class DataError(MiniMindError, ValueError):
    """Malformed input data; the message starts with `FILE:LINE:` where a line is to blame."""


class ConfigError(MiniMindError, ValueError):
    """An impossible configuration (model shape, flags, presets)."""


class CheckpointError(MiniMindError, ValueError):
    """A run directory or weight file that is missing, incomplete or inconsistent."""
