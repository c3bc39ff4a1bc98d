"""The project's exceptions.

Every error a user can cause (a bad config key, an unreadable image, a corrupt checkpoint) is raised
as a subclass of `MinidalleError` with a message that names the input and the fix, so nobody has to
read a traceback from deep inside torch to learn what went wrong.
"""


class MinidalleError(Exception):
    """Base class: catch this to handle any user-facing minidalle error."""


class ConfigError(MinidalleError, ValueError):
    """An unknown preset, an unknown config key, or a value of the wrong type."""


class DataError(MinidalleError):
    """A dataset that cannot be read: missing folder, too many bad files, bad caption file."""


class CheckpointError(MinidalleError):
    """A checkpoint that is missing, truncated, tampered with or written by something else."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that quote another library's."""
    return str(e).splitlines()[0] if str(e) else ""
