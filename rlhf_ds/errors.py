"""How a known failure reaches the user: one line on stderr and an exit code, in one place for every entry point.

A ``KnownError`` is a failure rlhf-ds anticipated (a bad config value, unusable data, a model of the wrong kind,
a damaged checkpoint, a run that cannot go on) whose message says what is wrong and how to fix it; a traceback
would only hide that line. The error classes of the modules (``ConfigError``, ``DataError``, ...) derive from
it, so an entry point needs one ``except``. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class KnownError(Exception):
    """A failure whose message names the cause and the fix (see the module docstring)."""


def fail(err: BaseException | str, code: int) -> int:
    """Print ``error: <message>`` on one line to stderr and return ``code`` (the entry point's exit code)."""
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return code


def run_main(main: Callable[[], int], code: int = 2) -> int:
    """``main()``'s exit code, or ``code`` after ``fail`` when it raises a ``KnownError`` or an ``OSError`` (a
    missing or unwritable path: its message names the path)."""
    try:
        return main()
    except (KnownError, OSError) as err:
        return fail(err, code)
