"""User-facing errors.

Anything a user can fix (a config key, a path, a corrupt shard) raises ``UserError`` with a
message that names the field or file and says what to do. The CLI prints the message without a
traceback and exits with status 2; internal bugs keep their traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; the message names the field or file and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or holds an invalid value."""


class DataError(UserError):
    """A data file or folder is missing, truncated, corrupt, or does not match the config."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or read."""


class DiskFullError(UserError):
    """A write ran out of space; what it was writing was rolled back, nothing is left half-written."""


class NonFiniteLossError(UserError):
    """Too many consecutive steps produced a NaN or inf loss; the run stopped."""
