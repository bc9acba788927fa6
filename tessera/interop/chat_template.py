"""Jinja chat templates rendered the way transformers renders them.

A published checkpoint ships its prompt format as a Jinja template (chat_template.jinja, chat_template.json,
processor_config.json or tokenizer_config.json). Rendering it with a different Jinja setup gives a different
prompt — a different model, in effect — so the environment here copies transformers' `_compile_jinja_template`
(pinned version): a sandbox with trim_blocks and lstrip_blocks, the loop-controls extension, the
`{% generation %}` tag (which also tells us where assistant text is), a `tojson` that doesn't escape HTML, and the
`raise_exception`, `strftime_now`, `dict` and `namespace` globals.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tessera.errors import DataError

Span = tuple[int, int]


class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text; we record its character span."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark", [jinja2.nodes.Name("_spans", "load")]), [], [],
                                      body).set_lineno(lineno)

    def _mark(self, tracker: tuple[list[str], list[Span]], caller) -> str:
        text = caller()
        rendered, spans = tracker  # what was rendered before this block, and the spans so far
        start = len("".join(rendered))
        spans.append((start, start + len(text)))
        return text


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Namespaces that refuse underscore attributes, as transformers' do."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template: not valid Jinja ({e.message}, line {e.lineno})") from None


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           **variables: Any) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its `{% generation %}` blocks (empty when the
    template has none). `variables` are what transformers passes too: its special tokens (bos_token, …)."""
    rendered: list[str] = []
    spans: list[Span] = []
    template = compile_template(source)  # outside the try: its DataError already says what is wrong
    try:
        for chunk in template.generate(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, _spans=(rendered, spans),
                                       **variables):
            rendered.append(chunk)
    except jinja2.exceptions.TemplateError as e:  # raise_exception's words, as the template wrote them
        raise DataError(f"chat template: {e}") from None
    except Exception as e:  # noqa: BLE001 — the template's own Python ('a' + [...]): a bad input, not a server bug
        raise DataError(f"chat template: rendering failed: {type(e).__name__}: {e}") from None
    return "".join(rendered), [span for span in spans if span[1] > span[0]]
