"""Writing result files so that no interruption can destroy them.

`atomic_write` writes a sibling temporary file, flushes and fsyncs it, then renames it over the
target: at every instant the target holds either its old content or the complete new one, never
an empty or half-written file, even when the process is killed mid-write. Standard library only,
so scorers and converters use it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """`with atomic_write(path) as out: out.write(...)` replaces `path` only when the block ends
    without an exception; on an exception the target is untouched and the temporary is removed.

    `mode` is "w" (text) or "wb" (bytes). The parent directory must exist. The new file gets the
    permissions a plain `open(path, "w")` would give it (the umask's), not mkstemp's 0600.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}")
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with open(descriptor, mode, encoding=None if "b" in mode else encoding,
                  newline=None if "b" in mode else newline) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Replace `path`'s content with `text`, atomically."""
    with atomic_write(path, newline=newline) as out:
        out.write(text)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (a power cut right after it keeps the new file)."""
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
