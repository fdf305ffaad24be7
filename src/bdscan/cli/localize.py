"""`bdscan localize` (being written)."""

HELP = "Not implemented yet."


def command() -> None:
    raise SystemExit("bdscan localize is not implemented yet")
