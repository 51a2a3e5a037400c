"""Small helpers for the command-line programs."""

from __future__ import annotations

import contextlib
import sys

# Mistakes a user can make (bad path, unreadable image, wrong ratio, malformed file...): reported
# in one line. ImageLoadError and CheckpointError are ValueErrors. No torch here, so scorers can
# use this too.
USER_ERRORS = (ValueError, OSError)


@contextlib.contextmanager
def user_errors():
    """Turn a user mistake into `error: ...` on stderr and exit status 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def quiet_transformers() -> None:
    """Hide transformers' progress bars and advisory warnings in command-line output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
