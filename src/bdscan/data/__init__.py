"""Instruction sets, prompt templates, trigger insertion and behaviour judges."""

from bdscan.data.records import Record, load_records
from bdscan.data.template import PromptTemplate, template_for
from bdscan.data.triggers import POSITIONS, insert_trigger

__all__ = ["Record", "load_records", "PromptTemplate", "template_for", "POSITIONS", "insert_trigger"]
