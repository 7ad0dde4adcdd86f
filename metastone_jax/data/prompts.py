"""How a question becomes prompt text: the plain `question\\n`, or the model's chat template plus an instruction.

A pretrained chat model (DeepSeek-R1 distills, QwQ, the released MetaStone-S1 weights) was trained on prompts in
its chat template, the Jinja template in `tokenizer_config.json` (or `chat_template.jinja`). It is rendered here the
way transformers' `tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True)`
renders it: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the `raise_exception`,
`strftime_now` and `tojson` helpers, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as
variables. The user message is the question, a newline and the instruction, as MetaStone-S1's evaluation data
writes it. A tokenizer without a template (the embedded task's, a base model's) keeps the plain format.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from metastone_jax.data.arithmetic import format_prompt

# The instruction of MetaStone-S1's evaluation prompts (and DeepSeek-R1's recommended one).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The special tokens transformers passes to a chat template as variables.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"


class PromptFormat:
    """Renders questions as prompts: plain, or through `chat_template` with `special_tokens` as its variables."""

    def __init__(
        self, chat_template: str | None = None, special_tokens: dict[str, str] | None = None, source: str = ""
    ):
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        if chat_template is not None:
            try:
                _compile(chat_template)
            except jinja2.TemplateError as error:
                raise ValueError(f"the chat template of {source} is not valid Jinja: {error}") from error

    @classmethod
    def from_tokenizer_config(cls, config: dict[str, Any], directory: str) -> PromptFormat:
        """The template of a tokenizer directory: `chat_template.jinja` (as transformers prefers), else the
        config's `chat_template`; a config with several named templates gives its "default" one."""
        template_path = os.path.join(directory, TEMPLATE_FILE)
        source = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as file:
                template, source = file.read(), template_path
        else:
            template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(template, dict):
            if "default" not in template:
                raise ValueError(f"{source} has chat templates {sorted(template)} but none named 'default'")
            template = template["default"]
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{source}: chat_template must be a string, got {type(template).__name__}")
        special_tokens = {name: config[name] for name in TEMPLATE_TOKENS if isinstance(config.get(name), str)}
        return cls(template, special_tokens, source)

    def render(self, question: str, instruction: str | None = None) -> str:
        """The prompt text of `question`. instruction=None: the default instruction for a templated model and
        none for the plain format; "" turns it off."""
        if self.chat_template is None:
            return format_prompt(f"{question}\n{instruction}" if instruction else question)
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        content = f"{question}\n{instruction}" if instruction else question
        try:
            return _compile(self.chat_template).render(
                messages=[{"role": "user", "content": content}],
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template of {self.source} failed to render a question: {error}") from error

    def tokenizer_config(self) -> dict[str, str]:
        """The tokenizer_config.json entries that reload this format."""
        if self.chat_template is None:
            return {}
        return {"chat_template": self.chat_template, **self.special_tokens}


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; a prompt renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON, as transformers gives them.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model repositories: the sandbox keeps them from reaching Python internals.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template)
