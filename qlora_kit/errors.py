"""Domain errors. The CLI turns these into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations


class QloraKitError(Exception):
    """An error the user can act on: what went wrong, and how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(QloraKitError):
    """Bad input: an unknown name, a malformed value, contradictory options."""

    exit_code = 2
