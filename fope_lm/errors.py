"""User-facing errors: one line that names the problem and the fix.

Entry points (train.py, eval.py, scripts/) catch `FopeError` and print only its message, so a typo or a
missing file never drowns in a traceback.
"""


class FopeError(Exception):
    """Base class for errors caused by the user's input (configs, data, checkpoints)."""


class ConfigError(FopeError, ValueError):
    """An invalid option, name or combination in a config."""


class DataError(FopeError):
    """Missing, empty, corrupt or incompatible token data."""


class CheckpointError(FopeError):
    """A missing, corrupt or incompatible checkpoint."""
