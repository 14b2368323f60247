"""Chat templates: `messages` -> the prompt text a language model continues.

A tokenizer state may carry its own Jinja `chat_template` (an imported Hugging Face tokenizer's, with
the same variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`); aidc's own models,
trained on plain text, get DEFAULT_TEMPLATE: one `role: content` line per message, then `assistant:`.
Rendered in Jinja's sandbox, as Hugging Face does.
"""

from __future__ import annotations

from functools import lru_cache

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_chat(messages: list[dict], tokenizer_state: dict, add_generation_prompt: bool = True) -> str:
    """Render `[{"role", "content"}, ...]` with the tokenizer's template (or the default)."""
    template = tokenizer_state.get("chat_template") or DEFAULT_TEMPLATE
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=tokenizer_state.get("bos_token", ""),
                                     eos_token=tokenizer_state.get("eos_token", ""))
