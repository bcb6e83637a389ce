"""User-facing errors.

A `FourbitError` is something the user caused and can fix (a bad config key, a missing file, a
malformed data row). The CLI prints its message as one paragraph and exits with status 2, without a
traceback unless `--debug` is given. Anything else is a bug in fourbit and keeps its traceback.
"""


class FourbitError(Exception):
    """An error the user can fix; the message names the thing and the fix."""


class ConfigError(FourbitError):
    """A bad config key, value or type."""


class DataError(FourbitError):
    """A bad data file or row."""
