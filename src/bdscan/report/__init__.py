"""Renderers: rich console tables, JSON, SARIF, Markdown, all from result dataclasses."""
