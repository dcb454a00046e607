"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad config key, a missing file, a column
that is not there). The CLI prints it as one ``tunesmith: error: ...`` line and exits 2, with no
traceback. Anything else is a bug in tunesmith and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's config, data or command line; the message says how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
