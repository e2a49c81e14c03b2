"""Where export says what it does (so that run and verify share the protocol, not each other)."""

from __future__ import annotations

from typing import Protocol


class ExportReporter(Protocol):
    """Where export says what it does: one line at a time, and progress through each phase."""

    def message(self, text: str) -> None: ...
    def start(self, phase: str, total: int) -> None: ...  # "merge" (bytes) or "verify" (models)
    def advance(self, amount: int) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass
