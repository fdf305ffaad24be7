"""Trigger-agnostic backdoor detection: attention-head similarity and output effect of
candidate keys (METHODS.md, "detect")."""

from bdscan.detect.config import DetectConfig
from bdscan.detect.scan import detect

__all__ = ["DetectConfig", "detect"]
