"""Exception types whose messages are meant for the user, not for a traceback reader."""


class ArchbenchError(Exception):
    """Base class: the CLI prints these as one clear line and exits with status 2."""


class ConfigError(ArchbenchError, ValueError):
    """A bad option, table row, suite or data-set entry."""


class DataError(ArchbenchError):
    """A data file that is missing, corrupt (checksum mismatch), empty or not UTF-8."""
