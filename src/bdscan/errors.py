"""Errors that the CLI turns into one line on stderr and a documented exit code.

Library code raises these; it never prints or exits. The CLI maps ``exit_code`` to the
process exit status (see README: 0 clean/ok, 1 suspicious, 2 error, 3 nothing to
analyse, 4 usage error).
"""

from __future__ import annotations


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
