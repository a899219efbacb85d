"""User-facing errors: one class, so the CLI can print them as one line and exit non-zero."""


class ChatRLError(Exception):
    """An error caused by the user's input (flags, files, data).

    The message says what was received, why it is wrong and how to fix it.
    The CLI prints it without a traceback and exits with status 2.
    """


class ConfigError(ChatRLError):
    """A bad flag, config file or combination of options."""


class DataError(ChatRLError):
    """A bad data source or row (names the file, row and field)."""


class ModelError(ChatRLError):
    """A model that cannot be found or loaded."""


class OutputError(ChatRLError):
    """An output folder that cannot be used or written (a file, read-only, full, another run's)."""


class TrainingDiverged(ChatRLError):
    """A non-finite loss, gradient or weight: the step stops before anything is saved."""
