"""Chat templates are code shipped with the checkpoint: render them within fixed bounds.

transformers renders a chat template in jinja's immutable sandbox, which keeps a template
away from Python's internals but lets it loop for ever or build gigabytes of text. bdscan
adds three bounds, each a one-line error naming the template's file:

- size: a template longer than ``MAX_TEMPLATE_CHARS`` is refused before it is compiled;
- steps and time: every render runs under ``step_budget``, which counts each executed
  template line and each Python call (a trace function, so it stops pure-Python loops of
  any shape, deterministically) and checks the wall clock every few hundred steps;
- output: at load, ``probe_template`` renders the template in ``BoundedSandbox``, which
  streams the output and stops at ``MAX_RENDER_CHARS``, and refuses the single operations
  that could allocate more in one C call (``*``, ``**``, ``%`` and call arguments over the
  cap); every later render's output is checked against the same cap.

A trace function is used instead of a timer thread because a Python thread cannot be
stopped from outside, whereas an exception raised from the trace function unwinds the
render in its own frame.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any, Callable, Iterator

MAX_TEMPLATE_CHARS = 256 * 1024  # the largest templates on the Hub are ~20 KiB
MAX_RENDER_STEPS = 1_000_000  # executed template lines + Python calls; a ChatML turn takes ~300
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 4 * 1024 * 1024  # room for a maximal prompt (records.MAX_PROMPT_CHARS) several times
TEMPLATE_FILENAME = "<template>"  # the code filename jinja gives templates built from a string
_CHECK_EVERY = 256  # steps between checks of the count and the clock


class RenderLimit(BaseException):
    """A template went over a bound. A ``BaseException``, so that no ``except Exception``
    inside jinja or transformers can swallow it and let the render go on."""


@contextmanager
def step_budget(max_steps: int = MAX_RENDER_STEPS, max_seconds: float = MAX_RENDER_SECONDS) -> Iterator[None]:
    """Raise ``RenderLimit`` inside the code run in this block once it has executed more than
    ``max_steps`` template lines and Python calls, or run longer than ``max_seconds``."""
    steps = [0]
    deadline = time.monotonic() + max_seconds

    def step() -> None:  # the trace functions below count inline; this runs every few hundred steps
        if steps[0] > max_steps:
            raise RenderLimit(f"rendering ran over {max_steps:,} steps (a loop without end?)")
        if time.monotonic() > deadline:
            raise RenderLimit(f"rendering took over {max_seconds:g} s")

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        steps[0] += 1
        if not steps[0] % _CHECK_EVERY:
            step()
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        steps[0] += 1
        if not steps[0] % _CHECK_EVERY:
            step()
        return on_line if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()  # a debugger's or coverage's tracer comes back afterwards
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


# --- the stricter sandbox used for the probe ---------------------------------------------

_NUMBER = re.compile(r"\d+")


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
        raise RenderLimit(f"{what} of {value:,} is over the {MAX_RENDER_CHARS:,} limit")


def _check_format_string(text: str) -> None:
    """Widths and precisions in a ``%`` or ``str.format`` string allocate that many chars."""
    for number in _NUMBER.findall(text):
        if len(number) > 7 or int(number) > MAX_RENDER_CHARS:
            raise RenderLimit(f"a format width of {number} is over the {MAX_RENDER_CHARS:,} limit")


def _check_arguments(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        _check_int(value, "an argument")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                raise RenderLimit(f"repeating {len(seq):,} items {n:,} times is over the {MAX_RENDER_CHARS:,} limit")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right * math.log2(abs(left)) > 4096:
            raise RenderLimit(f"{left} ** {right} is a number of over 4096 bits")
    elif operator == "%" and isinstance(left, str):
        _check_format_string(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {})


def _bounded_filter(fn: Callable) -> Callable:
    @wraps(fn)  # keeps jinja's pass_context/pass_environment marker
    def filter_(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args, kwargs)
        return fn(*args, **kwargs)

    return filter_


def _raise_exception(message: str) -> None:  # the helper transformers offers templates
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)  # jinja is imported, and the class built, once
def _sandbox_class() -> type:
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with
        it): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja's immutable sandbox, configured as transformers configures it, that also
        refuses single operations producing more than ``MAX_RENDER_CHARS``."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
            self.filters["tojson"] = _tojson
            self.filters = {name: _bounded_filter(fn) for name, fn in self.filters.items()}
            self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # noqa: D401
            _check_arguments(args, kwargs)
            return super().call(context, obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            # jinja wraps str.format when the template reads the attribute: check the
            # string's widths then, whichever way it is called later.
            if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in ("format", "format_map"):
                _check_format_string(value.__self__)
            return super().wrap_str_format(value)

    return BoundedSandbox


def probe_template(template: str, contents: tuple[str, ...], special_tokens: dict[str, str]) -> None:
    """Render ``template`` for one user turn of each content in the bounded sandbox,
    streaming the output; raise ``RenderLimit`` (or jinja's error) if it goes over a bound."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise RenderLimit(f"the template is {len(template):,} characters, over the {MAX_TEMPLATE_CHARS:,} limit")
    # Compiling is linear in the size just checked, and slow under a tracer: not counted.
    compiled = _sandbox_class()().from_string(template)
    for content in contents:
        with step_budget():
            size = 0
            context = {**special_tokens, "messages": [{"role": "user", "content": content}], "tools": None,
                       "documents": None, "add_generation_prompt": True}
            for chunk in compiled.generate(**context):
                size += len(chunk)
                if size > MAX_RENDER_CHARS:
                    raise RenderLimit(f"the rendered prompt is over the {MAX_RENDER_CHARS:,}-character limit")
