"""User-facing errors: one line naming the file and the fault, a non-zero exit, no traceback."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from typing import Callable

# Operating-system errors a user can cause and fix, in their words (strerror is capitalised and sometimes vague).
_OS_REASONS = {
    errno.ENOENT: "not found",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error",
    errno.EMFILE: "too many open files",
}


class EtesvsError(Exception):
    """An error caused by the user's input; its message is one line naming the file and what is wrong."""


class Interrupted(Exception):
    """The run was stopped by a signal: Ctrl-C, SIGTERM, or a child process (ffmpeg, a worker) killed by one.

    Never an :class:`EtesvsError`: an interruption is not the fault of an input, so code that skips bad inputs
    (``skip_bad_videos``) must not catch it. ``signal_number`` sets the exit status, 128 + N as shells report it.
    """

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message, int(signal_number))
        self.message = message
        self.signal_number = int(signal_number)

    def __str__(self) -> str:
        return self.message


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number Python does not know."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_os_error(error: OSError, path: object = None) -> str:
    """One line for an operating-system error: ``<path>: <reason>``, the path from ``path`` or the error itself.

    h5py and some libraries raise ``OSError`` without ``filename`` or ``errno``: their message is kept, on one line.
    """
    name = path if path is not None else error.filename
    reason = _OS_REASONS.get(error.errno) if error.errno is not None else None
    if reason is None:
        reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
        reason = reason[:1].lower() + reason[1:]
    if name is None or name == "":
        return reason
    return f"{name}: {reason}"


_handler_pid = 0


def _raise_interrupted(number: int, frame) -> None:
    if os.getpid() != _handler_pid:
        # A child forked by this process (a pool or DataLoader worker) inherited the handler: end the way a
        # process without it would, instead of raising into the worker's code and printing its traceback.
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return
    raise Interrupted(f"interrupted by {signal_name(number)}", number)


def run_main(main: Callable[[], object]) -> None:
    """Run a command's ``main()`` and turn every expected failure into one line on stderr, without a traceback.

    - :class:`EtesvsError` (a bad input): ``error: <message>``, exit status 1;
    - ``OSError`` (missing file, a directory where a file was expected, permission denied, disk full, ...):
      ``error: <path>: <reason>``, exit status 1;
    - Ctrl-C, SIGTERM or a child killed by a signal: ``error: interrupted ...``, exit status 128 + the signal's
      number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process ended by that signal.
    """
    global _handler_pid
    if threading.current_thread() is threading.main_thread():
        _handler_pid = os.getpid()
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main()
    except EtesvsError as error:
        _fail(str(error), 1)
    except OSError as error:
        _fail(describe_os_error(error), 1)
    except Interrupted as error:
        _fail(str(error), 128 + error.signal_number)
    except KeyboardInterrupt:
        _fail("interrupted", 128 + signal.SIGINT)


def _fail(message: str, status: int) -> None:
    # While exiting, a second Ctrl-C or SIGTERM ends the process at once, without a traceback from an exit handler.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)
