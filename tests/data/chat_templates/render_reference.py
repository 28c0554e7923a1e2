#!/usr/bin/env python3
"""Renders every template here as Hugging Face transformers does, into expected.json.

The environment is transformers' `_compile_jinja_template` (utils/chat_template_utils.py), restated
so that only jinja2 is needed: ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks) with the
loopcontrols extension, `{% generation %}` blocks that render their body, `raise_exception`,
`strftime_now` and `tojson` as json.dumps. The context is apply_chat_template's: messages,
tools=None, documents=None, add_generation_prompt, bos_token, eos_token. The conversation and the
date are tests/chat_templates.rs's; templates that refuse a system message get it without one.

    python3 tests/data/chat_templates/render_reference.py   # jinja2 3.1.x
"""
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = Path(__file__).resolve().parent
NOW = datetime(2024, 8, 1, tzinfo=timezone.utc)
PLAIN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "What is the capital of France?"},
]
NO_SYSTEM_ROLE = {"google-gemma-2-2b-it.jinja"}
# Tool-use variants that iterate `tools` unguarded: Python cannot iterate None, so transformers
# needs tools=[] for them (minijinja iterates none as empty, so wgllm renders them either way).
TOOLS_LIST = {
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
}


class Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render(source, messages, tools):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    ctx = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=True,
               bos_token="<s>", eos_token="</s>")
    # llama.cpp's firefunction_v2 format supplies these two (as wgllm does).
    if " functools[" in source:
        ctx.update(functions="", datetime=NOW.strftime("%b %d %Y %H:%M:%S GMT"))
    return env.from_string(source).render(**ctx)


def main():
    out = {}
    for path in sorted(HERE.glob("*.jinja")):
        messages = PLAIN[1:] if path.name in NO_SYSTEM_ROLE else PLAIN
        try:
            tools = [] if path.name in TOOLS_LIST else None
            out[path.name] = render(path.read_text(), messages, tools)
        except Exception as e:  # recorded, so that the Rust test shows the difference
            out[path.name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{path.name}: {type(e).__name__}: {e}", file=sys.stderr)
    (HERE / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(out)} templates, jinja2 {jinja2.__version__}")


if __name__ == "__main__":
    main()
