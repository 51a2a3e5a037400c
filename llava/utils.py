"""Small helpers for the command-line programs."""

from __future__ import annotations

import argparse
import contextlib
import sys

from llava.mm_utils import ImageLoadError
from llava.model import llava_arch
from llava.model.builder import CheckpointError
from llava.model.globalcom2 import LAYOUTS, check_retention_ratio

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


def _retention_ratio_argument(text: str) -> float:
    try:
        return check_retention_ratio(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] (1 = no compression), got {text!r}") from None


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """`--retention-ratio` and `--token-layout`; left out, `llava_arch`'s constants apply."""
    parser.add_argument("--retention-ratio", type=_retention_ratio_argument, default=None, metavar="R",
                        help="GlobalCom2's retention ratio in (0, 1]; 1 = vanilla LLaVA-NeXT "
                             f"(default: llava_arch.retention_ratio, now {llava_arch.retention_ratio})")
    parser.add_argument("--token-layout", choices=LAYOUTS, default=None,
                        help="order of the kept tokens: 'official' = the released code's sequence, 'spatial' = "
                             f"raster order with one newline per image row (default: {llava_arch.token_layout})")


def apply_compression_arguments(model, args) -> None:
    model.set_compression(getattr(args, "retention_ratio", None), getattr(args, "token_layout", None))
