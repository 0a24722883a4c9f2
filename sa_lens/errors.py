"""The exceptions sa_lens raises for what a user can fix, so callers (and the CLI) can tell them from bugs.

Every error sa_lens raises on purpose derives from :class:`SaLensError`; its message names the problem and the
fix. The CLI turns these into one line on stderr and exit status 2, and lets every other exception keep its
traceback, since that one is a bug to report. The subclasses also derive from the built-in they replace, so
``except ValueError`` written before they existed still catches them.
"""

from __future__ import annotations

__all__ = ["ConvergenceError", "InputError", "SaLensError"]


class SaLensError(Exception):
    """Base of every error sa_lens raises on purpose; the message says what is wrong and how to fix it."""


class InputError(SaLensError, ValueError):
    """An argument, option, file content or model does not fit what was asked (a wrong shape, range, name…)."""


class ConvergenceError(SaLensError, RuntimeError):
    """An optimisation stopped short of its target (a knowledge edit's loss stayed above its bound); nothing was applied."""
