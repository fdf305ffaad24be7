"""Frozen result dataclasses: what each analysis returns. Renderers and writers read these;
they never compute anything themselves."""

from bdscan.results.base import SCHEMA_VERSION, ResultBase

__all__ = ["SCHEMA_VERSION", "ResultBase"]
