"""Writing result files so that no interruption can destroy them, and one writer per file.

`atomic_write` writes a sibling temporary file, flushes and fsyncs it, then renames it over the
target: at every instant the target holds either its old content or the complete new one, never
an empty or half-written file, even when the process is killed mid-write. `file_lock` holds an
advisory lock that the operating system releases when its process dies, however it dies, so a
killed run never leaves a stale lock. Standard library only, so scorers and converters use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
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


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporaries that `atomic_write(path)` leaves when its process is killed mid-write.
    Only safe while holding the lock on `path` (no other writer). Returns the removed paths."""
    target = os.fspath(path)
    pattern = os.path.join(glob.escape(os.path.dirname(os.path.abspath(target))),
                           f".{glob.escape(os.path.basename(target))}.*.tmp")
    removed = glob.glob(pattern)
    for temporary in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    return removed


def write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Replace `path`'s content with `text`, atomically."""
    with atomic_write(path, newline=newline) as out:
        out.write(text)


def make_parent_dir(path: str | os.PathLike) -> None:
    """Create the directory `path` goes into; a ValueError naming the culprit when a file stands
    where a directory must be (instead of `[Errno 17] File exists`)."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = parent
        while not os.path.exists(blocking):
            blocking = os.path.dirname(blocking)
        raise ValueError(f"cannot write {os.fspath(path)}: {blocking} is a file, not a directory") from None


class FileLocked(Exception):
    """Another process holds the lock; `holders` are the process ids it recorded (may be empty)."""

    def __init__(self, path: str, holders: list[int]):
        super().__init__(f"{path} is locked by process {', '.join(map(str, holders)) or '(unknown)'}")
        self.path, self.holders = path, holders


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False):
    """Hold an advisory `flock` on the lock file `path` (created if missing) for the block, or
    raise `FileLocked` at once if a conflicting lock is held: exclusive conflicts with any lock,
    shared with exclusive only. Holders write their process id into the file, so the refusal can
    name them. The last holder to leave removes the file."""
    path = os.fspath(path)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holders = [int(word) for word in handle.read().split() if word.isdigit()]
            handle.close()
            raise FileLocked(path, holders) from None
        # An exclusive holder may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else sees, and must lock the one now at `path`.
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        if not shared:
            handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if _last_holder(handle, shared):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        handle.close()


def _last_holder(handle, shared: bool) -> bool:
    """Whether no other process holds the lock any more, so the lock file can go. A shared holder
    unlocks, then tries an exclusive lock: of several leaving at once, the last to unlock gets it."""
    if not shared:
        return True
    fcntl.flock(handle, fcntl.LOCK_UN)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
