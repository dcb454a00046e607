"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad config key, a missing file, a column
that is not there). The CLI prints it as one ``tunesmith: error: ...`` line and exits 2, with no
traceback. Anything else is a bug in tunesmith and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's config, data or command line; the message says how to fix it.

    Always one line: line breaks that come from the user's own data (a column name, a label, a
    path) are shown escaped, so the message stays one `tunesmith: error:` line."""

    def __init__(self, message: object = ""):
        text = str(message)
        if any(c in text for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
            text = "".join(c if c.isprintable() or c in " \t" else repr(c)[1:-1] for c in text)
        super().__init__(text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(Exception):
    """An observer stopped a run on purpose before its end (a sweep pruned an unpromising trial): the run
    directory records it (failed.json with status "pruned") and holds no model."""
