"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback. It subclasses ValueError so library users can catch it the usual way.
"""

import difflib


class UserError(ValueError):
    """Bad input (config, paths, files, data) with a message that says how to fix it."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
