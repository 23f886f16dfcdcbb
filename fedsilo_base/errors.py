"""The one base class the CLI runner recognises as "the user's to fix"."""

from __future__ import annotations


class UserError(Exception):
    """Base of every package's error hierarchy: bad input, a missing home, a refused request.

    Its message is one line (what, where, how to fix); the CLI runner prints it without a
    traceback and exits 2.
    """
