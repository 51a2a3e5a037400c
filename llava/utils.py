"""Small helpers for the command-line programs."""

from __future__ import annotations

import contextlib
import sys

from llava.mm_utils import ImageLoadError
from llava.model.builder import CheckpointError

# Mistakes a user can make (bad path, unreadable image, wrong ratio...): reported in one line.
USER_ERRORS = (ImageLoadError, CheckpointError, FileNotFoundError, ValueError)


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
