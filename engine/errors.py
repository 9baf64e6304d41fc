"""The engine's error taxonomy. Torch-free, so the server can catch these without importing torch.

Every message names the bad value, what was accepted and what to do about it.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    retryable: bool = False


class ConfigError(EngineError, ValueError):
    """A configuration value is missing or out of range; the message names the dotted key."""


class CheckpointError(EngineError):
    """A checkpoint folder cannot be used: a missing or broken file, or keys that do not match.

    `report` (an `engine.checkpoint.report.LoadReport`) lists every problem found, when the
    error comes from a whole-folder check.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class InputError(EngineError, ValueError):
    """Bad input to a session (image, audio, size): the message says what is accepted."""


class CapacityExhausted(EngineError):
    """No room for another session now; `retry_after` seconds is a sensible wait."""

    retryable = True

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
