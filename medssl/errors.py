"""Errors as users see them: one line naming the file or setting and the problem; tracebacks on request.

MONAI wraps whatever a config expression raises in ``RuntimeError("Failed to evaluate ...")``
(and instantiation failures in ``"Failed to instantiate ..."``), so medssl's own clear message
ended up in the middle of a 50-90 line traceback. :func:`describe` walks the chain of causes to
the innermost exception and prints that. Errors a user can fix (bad files, bad settings) are
:data:`USER_ERRORS`; anything else is reported as an internal error, still in one line, with how
to get the traceback.
"""

from __future__ import annotations

import os
import sys

__all__ = ["UserError", "USER_ERRORS", "root_exception", "is_user_error", "describe", "install_excepthook", "VERBOSE_ENV"]



class UserError(Exception):
    """Base of the errors a user can fix that are not a ``ValueError`` or ``OSError`` by nature: a
    batch without the keys its task reads (also a ``KeyError``), a loader whose schedule is not the
    trainer's (also a ``RuntimeError``), data of which nothing loads. Its text is the message
    itself (a ``KeyError`` would print it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ValueError: a bad setting or file content; OSError: missing/unreadable files and folders;
# FloatingPointError: training diverged (non-finite steps); UserError: the rest medssl raises for users to fix.
USER_ERRORS = (ValueError, OSError, FloatingPointError, UserError)
VERBOSE_ENV = "MEDSSL_VERBOSE"  # set to 1 for full tracebacks under `python -m monai.bundle`


def root_exception(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc`` (following ``raise ... from``, then implicit context of MONAI's wrappers)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
        if nxt is None:
            break
        exc = nxt
    return exc


def is_user_error(exc: BaseException) -> bool:
    return isinstance(root_exception(exc), USER_ERRORS)


def describe(exc: BaseException) -> str:
    """One line for ``exc``: the innermost message; the exception's type where the message alone would not say."""
    root = root_exception(exc)
    message = str(root).strip().splitlines()[0] if str(root).strip() else ""
    if isinstance(root, USER_ERRORS) and message:
        if isinstance(root, OSError) and root.filename and str(root.filename) not in message:
            message = f"{root.filename}: {message}"
        return message
    name = type(root).__name__
    return f"internal error, {name}: {message or 'no message'} (a bug in medssl or a library; -v or {VERBOSE_ENV}=1 shows where)"


def install_excepthook(prog: str) -> None:
    """Print uncaught errors as ``prog: error: <one line>`` unless ``$MEDSSL_VERBOSE`` is set."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
            return
        if not issubclass(kind, Exception):
            return previous(kind, exc, tb)
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)

    sys.excepthook = hook
