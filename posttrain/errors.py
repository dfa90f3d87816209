"""User-facing errors.

Anything raised as a ``PosttrainError`` is printed by the CLI as a plain message
(no traceback): it describes a problem with the user's input, config or
environment and says how to fix it.
"""


class PosttrainError(Exception):
    """A problem the user can fix; the message is shown as is."""


class ConfigError(PosttrainError):
    """A config file or override is invalid."""


class DataError(PosttrainError):
    """Training data is unusable; the message carries the row-level report."""


class MissingExtraError(PosttrainError):
    """An optional dependency is needed but not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'posttrain[{extra}]'"
        )
