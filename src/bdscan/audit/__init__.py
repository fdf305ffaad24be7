"""``bdscan audit``: one command from a downloaded model to a verdict, a purified model and
a self-contained HTML report (stages in ``pipeline``; artefacts in ``write``)."""

from bdscan.audit.pipeline import DEFAULT_METHOD, AuditConfig, audit

__all__ = ["DEFAULT_METHOD", "AuditConfig", "audit"]
