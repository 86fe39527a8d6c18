"""Errors a person can act on: one line naming the flag, file or folder, a non-zero exit code, no traceback."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from resumable.logs import log_to_files_only

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
ENVIRONMENT_EXIT_CODE = 74  # sysexits' EX_IOERR: the machine, not the input (full disk, unwritable folder)


class UserError(Exception):
    """A mistake in the command line, a config file or a data file: reported in one line, never a traceback."""

    exit_code = USER_ERROR_EXIT_CODE

    def __init__(self, message: object = "") -> None:
        # one line whatever a quoted value holds: a line break in a flag value is shown, not obeyed
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class EnvironmentFailure(UserError):
    """The machine failed the run (full disk, unwritable or read-only folder): one line, exit 74, nothing lost."""

    exit_code = ENVIRONMENT_EXIT_CODE


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's `main` so that a `UserError` prints `error: ...` on stderr and exits with its code (2, 74)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            log_to_files_only(f"error: {err}")  # train.log, when the run got far enough to have one
            sys.exit(err.exit_code)
        except Exception:  # a bug: its traceback still goes to stderr, and into train.log for the bug report
            log_to_files_only(traceback.format_exc().rstrip())
            raise

    return wrapper


def warn(message: str, level: str = "WARNING") -> None:
    """One line on stderr with its level, for the person watching the run."""
    print(f"{level}: {message}", file=sys.stderr, flush=True)
