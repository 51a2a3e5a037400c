"""Small helpers for the command-line programs."""

from __future__ import annotations

import contextlib
import sys
import warnings

# Mistakes a user can make (bad path, unreadable image, wrong ratio, malformed file...): reported
# in one line. ImageLoadError and CheckpointError are ValueErrors. No torch here, so scorers can
# use this too.
USER_ERRORS = (ValueError, OSError)


class LlavaWarning(UserWarning):
    """Something the user should know about a run that still goes on (a ratio that keeps no image
    token, a prompt cut to the model's length). Command-line programs print it as one line."""


@contextlib.contextmanager
def user_errors():
    """Turn a user mistake into `error: ...` on stderr and exit status 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def quiet_transformers() -> None:
    """Hide transformers' progress bars and advisory warnings in command-line output; our own
    warnings in one line."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    show_warnings_in_one_line()


def show_warnings_in_one_line() -> None:
    """Print our own warnings as `warning: ...` (no file, line and source echo); others as Python does."""
    if getattr(warnings.showwarning, "one_line", False):
        return
    python_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LlavaWarning):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            python_showwarning(message, category, filename, lineno, file, line)

    showwarning.one_line = True
    warnings.showwarning = showwarning
