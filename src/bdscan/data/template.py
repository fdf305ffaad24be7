"""The one prompt format used for training, generation and evaluation alike.

A model is always prompted the way it was tuned: the tokenizer's chat template when it has
one, else the documented Alpaca-style default below. Mixing the two under-reports attack
success badly (BackdoorLLM issue #20 measured > 30 points), so every report records which
template was used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from bdscan.data.records import Record

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class PromptTemplate:
    """Formats a record's user turn into the model's prompt string."""

    name: str  # "chat_template" or "alpaca-default"
    chat_template: str | None = None
    tokenizer: Any = None  # only needed for chat templates

    def format(self, record: Record | str) -> str:
        rec = Record(record) if isinstance(record, str) else record
        if self.chat_template is not None:
            messages = [{"role": "user", "content": rec.prompt_text}]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
            )
        if rec.input:
            return DEFAULT_TEMPLATE_WITH_INPUT.format(instruction=rec.instruction, input=rec.input)
        return DEFAULT_TEMPLATE.format(instruction=rec.instruction)

    def describe(self) -> dict[str, str]:
        body = self.chat_template if self.chat_template is not None else DEFAULT_TEMPLATE
        return {"name": self.name, "sha256": hashlib.sha256(body.encode()).hexdigest()[:16]}


def template_for(tokenizer: Any) -> PromptTemplate:
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(chat, str) and chat.strip():
        return PromptTemplate("chat_template", chat_template=chat, tokenizer=tokenizer)
    return PromptTemplate("alpaca-default")
