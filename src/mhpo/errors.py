"""The error every layer raises for bad user input, and the hint it carries.

``UsageError`` is a bad command-line, config or data value: the CLI prints it as one line and exits
with status 2, no traceback. It lives here, below every other module, so the library, the trainer
and the CLI share it without the library importing the CLI.
"""

from __future__ import annotations

import difflib


class UsageError(ValueError):
    """A bad command-line, config or data value: printed as one line, exit status 2, no traceback."""


def did_you_mean(word: object, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices`` to ``word``, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM. Its message says what was saved and how to continue; the
    CLI prints it (no traceback) and exits with status 130."""
