"""Errors that reach the user.

Anything raised as a :class:`HataoriError` is a mistake in the user's input (a config key, a
corpus file, a shard from another tokenizer) and carries a message that says where it is and
what to do. The command-line entry point prints it without a traceback and exits with status 2.
"""


class HataoriError(Exception):
    """A problem with the user's input, described so that they can fix it."""


class ConfigError(HataoriError):
    """An invalid config value or key. ``key`` is the dotted path, e.g. ``optim.lr``."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class InputError(HataoriError):
    """Malformed input data; the message names the file and, where there is one, the line."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
