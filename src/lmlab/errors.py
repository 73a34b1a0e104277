"""The one exception type for a user's mistake.

Anything raised as :class:`LmlabError` is printed by the command line as a single line
(``lmlab <command>: error: <message>``) with exit status 2, never as a traceback.  Library
callers get an ordinary exception (it subclasses ``ValueError``) that they can catch.
"""

from __future__ import annotations


class LmlabError(ValueError):
    """A bad input or setting, explained in one line that names the problem."""
