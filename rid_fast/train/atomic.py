"""Files written atomically: a reader sees the old content or the new, never a torn mix.

Each writer fills a temporary file in the target's folder, flushes it to disk and moves it into
place with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves the previous file intact.
The temporary name is unique (``mkstemp``), so processes writing the same file cannot clobber each
other's half-written copy.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["replace_atomically", "write_bytes_atomic", "write_text_atomic", "write_csv_atomic"]


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The mode ``open`` gives a new file; read once, at import, while no other thread runs.
_NEW_FILE_MODE = 0o666 & ~_umask()


def replace_atomically(
    path: str | Path, write: Callable[[IO[bytes]], None], *, keep_previous: str | Path | None = None
) -> None:
    """Replace ``path`` by what ``write(file)`` writes into a binary file handle. With
    ``keep_previous``, the file at ``path`` (if any) is first moved there, once the new content is
    safely on disk: a crash between the two moves leaves the previous content under that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            # mkstemp creates the file readable by its owner only; give it the mode any new file gets.
            os.fchmod(file.fileno(), _NEW_FILE_MODE)
            os.fsync(file.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    replace_atomically(path, lambda file: file.write(data))


def write_text_atomic(text: str, path: str | Path) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes_atomic(text.encode(), path)


def write_csv_atomic(rows: list[dict], path: str | Path, columns: list[str] | None = None) -> None:
    """All rows under ``columns`` (default: the union of their keys, in first-seen order; other
    keys are left out), replaced atomically."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
