"""User-facing errors: one line naming the file and the fault, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from typing import Callable


class EtesvsError(Exception):
    """An error caused by the user's input; its message is one line naming the file and what is wrong."""


def run_main(main: Callable[[], object]) -> None:
    """Run a command's ``main()``; turn an :class:`EtesvsError` into ``error: <msg>`` on stderr and exit 1."""
    try:
        main()
    except EtesvsError as error:
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
