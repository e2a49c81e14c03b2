"""Files and directories written whole: built in a hidden sibling, renamed into place when complete.

A reader (or a crash) never sees a half-written recipe, metadata file, checkpoint, random-init base or
export: the new one appears at once, and the one it replaces stays until then."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_dir(final: Path, tmp_name: str) -> Iterator[Path]:
    """An empty directory ``tmp_name`` next to ``final`` to write into; when the block completes it
    replaces ``final`` (:func:`replace_dir`), when it raises (a full disk, Ctrl-C) it is removed. One
    left by a killed process is cleared first."""
    tmp = final.with_name(tmp_name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed only after."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.qlora-kit-old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a file via a temporary file in the same directory, renamed into place when complete.

    The file gets the mode a plain ``open`` would give it (0666 less the umask; a replaced file keeps
    its own), not the 0600 of the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), _file_mode(path))
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        return 0o666 & ~umask
