"""Errors that the CLI turns into one line on stderr and a documented exit code.

Library code raises these; it never prints or exits. The CLI maps ``exit_code`` to the
process exit status (see README: 0 clean/ok, 1 suspicious, 2 error, 3 nothing to
analyse, 4 usage error).
"""

from __future__ import annotations

import re
import unicodedata

# CSI and OSC escape sequences, as torch and other libraries put into their messages.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?")


class BdscanError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 2


class InputError(BdscanError):
    """A missing, corrupt, unsafe or malformed input (file, checkpoint, data set)."""


class UsageError(BdscanError):
    """Arguments that contradict each other or name something that does not exist."""

    exit_code = 4


class NothingToAnalyse(BdscanError):
    """The input was readable but held nothing the requested analysis can scan."""

    exit_code = 3


def printable(text: str) -> str:
    """``text`` as one line of plain characters, safe to print on a terminal.

    Messages quote file contents and arguments, which an attacker controls: escape
    sequences are dropped, and line breaks and other control or invisible formatting
    characters (bidi overrides included) are shown as ``\\uXXXX`` rather than acted on.
    """
    text = _ANSI.sub("", text)
    return "".join(
        c if c == " " or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Zs") else f"\\u{ord(c):04x}"
        for c in text
    )


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error quotes of a library's exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
