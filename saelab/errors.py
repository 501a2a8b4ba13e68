"""The small set of exceptions saelab raises for a user's mistake (as opposed to a bug).

Each carries a message that says what is wrong and, where there is one, how to fix it (`hint`). The CLI prints
`saelab <command>: error: <message>` (and `hint: <hint>`) and exits 2; any other exception is a bug and keeps its
traceback. Every module raises these (or a subclass) for bad input, so the boundary needs no list of its own.
"""

from __future__ import annotations


class SaelabError(Exception):
    """Base: a user-facing problem. `str(e)` is the one line to print; `hint` an optional fix."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(SaelabError, ValueError):
    """A configuration or flag value is invalid; the message names the field and says what is allowed."""


class DataError(SaelabError):
    """A corpus, dataset, label file or other input data is missing, empty or malformed."""


class CacheError(DataError, RuntimeError):
    """An activation cache is missing, incomplete, corrupt or does not match what was asked."""


class ModelError(SaelabError):
    """A language model cannot be loaded, or does not have what was asked of it (a hook, a width)."""


class TrainingError(SaelabError, FloatingPointError):
    """Training cannot go on (a loss that diverged); the last checkpoint is intact."""


class SAEFileError(SaelabError, ValueError):
    """An SAE folder is missing, truncated, inconsistent or holds non-finite weights."""


__all__ = ["SaelabError", "ConfigError", "DataError", "CacheError", "ModelError", "SAEFileError", "TrainingError"]
