"""Atomic writes: a file (or a directory) is written beside its destination and renamed into place, so a reader
or a resumed run sees either the previous version or the new one, never a half-written file. A full disk
(``ENOSPC``) while writing is one :class:`BebopError` naming the path; the previous version stays in place."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bebop.errors import BebopError


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk: ``OSError(ENOSPC)``, or safetensors' wrapped ``(os error 28)``."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "(os error 28)" in str(e)


@contextmanager
def disk_full_is_clear(path: str | Path) -> Iterator[None]:
    """Turn a full disk inside the block into one BebopError naming ``path``."""
    try:
        yield
    except Exception as e:
        if is_no_space(e):
            raise BebopError(f"no space left on device writing {path}") from None
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temp file in ``path``'s directory, which is fsynced and renamed over ``path``."""
    path = Path(path)
    with disk_full_is_clear(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a sibling temp directory to fill; on success it replaces ``out`` (the old one is moved aside first
    and removed after), on failure it is removed and ``out`` is untouched."""
    out = Path(out)
    with disk_full_is_clear(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            yield tmp
            old = out.with_name(f".{out.name}.old")
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
