"""`bdscan detect` (being written)."""

HELP = "Not implemented yet."


def command() -> None:
    raise SystemExit("bdscan detect is not implemented yet")
