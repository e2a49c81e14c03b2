"""Domain errors. The CLI turns these into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


class WriteFailed(QloraKitError):
    """The OS refused a write (a full disk, a quota, permissions); what was half-written is removed."""


def _hidden_os_error(exc: Exception) -> str | None:
    """The OS failure inside a library's own exception, or ``None`` when it is not one.

    safetensors reports a full disk as ``SafetensorError("... I/O error: No space left on device (os
    error 28)")``; torch.save's zip writer only as ``RuntimeError("[enforce fail at inline_container.cc]
    . unexpected pos N vs M")`` (it never sees the errno, whether given a path or a file object)."""
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].strip()
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "the write stopped short (torch.save does not say why; most often a full disk)"
    return None


@contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Report a failed write of ``what`` under ``path`` as one :class:`WriteFailed` line, with the
    free space left there. Callers remove their temporary files themselves (before this reports)."""
    try:
        yield
        return
    except OSError as exc:
        reason: str | None = exc.strerror or str(exc)
    except Exception as exc:
        reason = _hidden_os_error(exc)
        if reason is None:
            raise
    raise WriteFailed(
        f"could not write {what} to {path}: {reason} ({_free(Path(path))} free there)",
        "free some space (or write elsewhere) and run the command again",
    ) from None


def _free(path: Path) -> str:
    import shutil

    for candidate in (path, *path.parents):
        if candidate.exists():
            return f"{shutil.disk_usage(candidate).free / 2**20:.1f} MiB"
    return "unknown"
