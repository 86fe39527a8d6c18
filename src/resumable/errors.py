"""User errors: one line naming the flag or file, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the command line, a config file or a data file: reported in one line, never a traceback."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's `main` so that a `UserError` prints `error: ...` on stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper


def warn(message: str, level: str = "WARNING") -> None:
    """One line on stderr with its level, for the person watching the run."""
    print(f"{level}: {message}", file=sys.stderr, flush=True)
