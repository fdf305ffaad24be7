"""The one prompt format used for training, generation and evaluation alike.

A model is always prompted the way it was tuned: the tokenizer's chat template when it has
one, else the documented Alpaca-style default below. Mixing the two under-reports attack
success badly (BackdoorLLM issue #20 measured > 30 points), so every report records which
template was used.

A chat template comes from the checkpoint and is untrusted code: it is probed at load and
every render is bounded (see ``chat_render``); each distinct prompt is rendered once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdscan.data.chat_render import MAX_RENDER_CHARS, RenderLimit, probe_template, step_budget
from bdscan.data.records import MAX_PROMPT_CHARS, Record, prompt_too_long
from bdscan.errors import InputError

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")  # where transformers reads it
RENDER_CACHE_SIZE = 8192  # distinct prompts kept; detect renders a few thousand


def _template_error(origin: str, e: BaseException) -> InputError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return InputError(f"{origin}: chat template refused: {detail}")


@dataclass(frozen=True)
class PromptTemplate:
    """Formats a record's user turn into the model's prompt string."""

    name: str  # "chat_template" or "alpaca-default"
    chat_template: str | None = None
    tokenizer: Any = None  # only needed for chat templates
    origin: str = "chat template"  # the file it was read from, for error messages
    _rendered: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def format(self, record: Record | str) -> str:
        rec = Record(record) if isinstance(record, str) else record
        reason = prompt_too_long(rec)
        if reason:  # callers that can skip a prompt check this first; the rest stop here
            raise InputError(f"prompt {rec.instruction[:40]!r}...: {reason}")
        if self.chat_template is not None:
            return self._render_chat(rec.prompt_text)
        if rec.input:
            return DEFAULT_TEMPLATE_WITH_INPUT.format(instruction=rec.instruction, input=rec.input)
        return DEFAULT_TEMPLATE.format(instruction=rec.instruction)

    def _render_chat(self, content: str) -> str:
        """transformers' sandboxed renderer under the step and time budget, output capped;
        once per distinct prompt."""
        text = self._rendered.get(content)
        if text is not None:
            return text
        messages = [{"role": "user", "content": content}]
        try:
            with step_budget():
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          chat_template=self.chat_template)
        except (RenderLimit, Exception) as e:  # also jinja's TemplateError, raise_exception(), MemoryError
            raise _template_error(self.origin, e) from None
        if len(text) > MAX_RENDER_CHARS:
            raise _template_error(self.origin, RenderLimit(f"the rendered prompt is over {MAX_RENDER_CHARS:,} characters"))
        if len(self._rendered) >= RENDER_CACHE_SIZE:
            self._rendered.pop(next(iter(self._rendered)))
        self._rendered[content] = text
        return text

    def describe(self) -> dict[str, str]:
        body = self.chat_template if self.chat_template is not None else DEFAULT_TEMPLATE
        return {"name": self.name, "sha256": hashlib.sha256(body.encode()).hexdigest()[:16]}


def template_origin(tokenizer: Any) -> str:
    """The file a tokenizer's chat template was read from (for messages)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    gguf = (getattr(tokenizer, "init_kwargs", None) or {}).get("gguf_file")
    if gguf:  # transformers read the template from the GGUF's metadata
        return f"{folder / gguf} (tokenizer.chat_template)"
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    return f"{folder}/ chat template" if str(folder) not in ("", ".") else "the tokenizer's chat template"


def template_for(tokenizer: Any) -> PromptTemplate:
    """The tokenizer's chat template, probed within the bounds (raises ``InputError``
    naming its file), or the Alpaca default."""
    chat = getattr(tokenizer, "chat_template", None)
    if not (isinstance(chat, str) and chat.strip()):
        return PromptTemplate("alpaca-default")
    origin = template_origin(tokenizer)
    specials = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items() if isinstance(v, str)}
    try:  # a short turn and the longest prompt bdscan accepts
        probe_template(chat, ("Hello.", "x" * MAX_PROMPT_CHARS), specials)
    except (RenderLimit, Exception) as e:  # also a syntax error, raise_exception() on a plain user turn
        raise _template_error(origin, e) from None
    template = PromptTemplate("chat_template", chat_template=chat, tokenizer=tokenizer, origin=origin)
    # A template that drops the user's turn (renders "" or a constant) makes every prompt the same:
    # a scan of it measures nothing, and an empty prompt failed deep inside generation.
    sample = "Name a fruit."
    if sample not in template.format(Record(sample)):
        raise _template_error(origin, ValueError("its prompt does not contain the user's message"))
    return template
