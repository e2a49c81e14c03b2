"""Directories written whole: built in a hidden sibling, renamed into place when complete.

A reader (or a crash) never sees a half-written checkpoint, random-init base or export: the new
directory appears at once, and the one it replaces stays until then."""

from __future__ import annotations

import contextlib
import os
import shutil
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
