"""User errors: one clear line on stderr and a non-zero exit, never a traceback.

Entry points (train.py, sample.py, demo.py, evaluate.py, prepare_data.py, the converter) run
their main function through `run_cli`; library code raises `UserError` (or one of the
standard exceptions listed in `USER_EXCEPTIONS`) with a message that names what is wrong
and what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input from the user (config, flags, data, checkpoints, sizes, paths).

    `exit_code` 2 = bad usage or input, 3 = the run itself failed (diverged, disk full).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# Raised by library code for bad input; shown as one line. KeyError prints its repr, so its
# message is taken from args[0].
USER_EXCEPTIONS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError, ValueError, KeyError)


def one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    if isinstance(e, KeyError) and msg and " " not in msg:  # a bare key says nothing about where it was missing
        return f"missing key {msg!r} (SGM_JAX_TRACEBACK=1 shows where)"
    return msg or type(e).__name__


def fail(message: str, exit_code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run `main()`; user errors become `error: <one line>` on stderr and a non-zero exit.

    SGM_JAX_TRACEBACK=1 shows the full traceback instead (for bug reports).
    """
    try:
        code = main()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except USER_EXCEPTIONS as e:
        if os.environ.get("SGM_JAX_TRACEBACK") == "1":
            raise
        fail(one_line(e), getattr(e, "exit_code", 2))
    raise SystemExit(code or 0)
