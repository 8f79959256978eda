"""Chat templates: the Jinja2 programs that Hugging Face tokenizers ship, rendered the way transformers renders them."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from fournil.errors import FournilError


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise FournilError(f"the chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise FournilError(f"the model's chat template is not valid Jinja2: {e}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special_tokens) -> str:
    """The conversation as the text the model was trained on; with ``add_generation_prompt`` it ends where the
    assistant's answer starts."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FournilError(f"a chat message needs a 'role' and a 'content' string, got {m!r}")
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
