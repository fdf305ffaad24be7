"""Library errors name the input field (in backticks, e.g. `localization`); a command
tells the user the flag that sets it."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

from bdscan.errors import BdscanError


@contextlib.contextmanager
def flags_for_fields(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ``BdscanError`` with each `field` replaced by its flag."""
    try:
        yield
    except BdscanError as e:
        message = str(e)
        for field, flag in flags.items():
            message = message.replace(f"`{field}`", flag)
        if message == str(e):
            raise
        raise type(e)(message) from None
