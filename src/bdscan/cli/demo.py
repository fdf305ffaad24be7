"""`bdscan demo` (being written)."""

HELP = "Not implemented yet."


def command() -> None:
    raise SystemExit("bdscan demo is not implemented yet")
