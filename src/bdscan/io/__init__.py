"""Resolve a source (path or Hub id), load it safely, and save results atomically."""

from bdscan.io.load import Subject, load_subject
from bdscan.io.resolve import ResolvedSource, resolve_source
from bdscan.io.save import atomic_output_dir, save_subject

__all__ = ["Subject", "load_subject", "ResolvedSource", "resolve_source", "atomic_output_dir", "save_subject"]
