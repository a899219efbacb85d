"""Conversation formats: how a list of turns becomes the text the model sees.

Two formats, chosen per run and recorded beside every saved model (so chat and serve use the
one the model was trained with):
- "chat":  the tokenizer's own chat template (ChatML for SmolLM2, Llama-3's, Qwen's...);
- "plain": DeepSpeed-Chat's `\\n\\nHuman: ...\\n\\nAssistant: ...` format, for base models and
           for datasets such as Dahoas/rm-static whose prompts already use it.
"auto" picks "chat" when the tokenizer has a template, else "plain".

A response is appended to the rendered prompt as text, then the EOS token is appended as a
token id by the tokenizing code (never as a string, which some tokenizers would split).
"""

from __future__ import annotations

import re

from ..errors import ConfigError

TEMPLATES = ("auto", "chat", "plain")
HUMAN, ASSISTANT = "Human:", "Assistant:"
# Text that starts a new turn in the plain format; generation stops there.
PLAIN_STOP = "\n\nHuman:"
_TURN = re.compile(r"(?:^|\n\n|\s)(Human|Assistant):", re.S)


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise ConfigError(f"--template {template!r} is not known; use one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--template chat was asked for but tokenizer {tokenizer.name_or_path} has no "
                          "chat template; use --template plain (Human:/Assistant: turns)")
    return template


def render_prompt(tokenizer, messages: list[dict], template: str) -> str:
    """Text of a conversation that ends with a user turn, ready for the assistant's answer.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
    """
    if template == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template != "plain":
        raise ValueError(f"render_prompt needs a resolved template, got {template!r}")
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        else:
            tag = HUMAN if m["role"] == "user" else ASSISTANT
            parts.append(f"\n\n{tag} {m['content'].strip()}")
    return "".join(parts) + f"\n\n{ASSISTANT}"


def render_response(response: str, template: str) -> str:
    """The response text as it follows the rendered prompt (EOS is added separately as an id)."""
    response = response.strip()
    return " " + response if template == "plain" else response


def parse_plain_conversation(text: str) -> list[dict]:
    """Split `\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:` into turns.

    The trailing empty assistant turn is dropped, so the result ends with the last user turn.
    Text without any Human:/Assistant: marker becomes one user turn.
    """
    pieces = _TURN.split(text)
    if len(pieces) == 1:
        return [{"role": "user", "content": text.strip()}]
    turns = []
    lead = pieces[0].strip()
    if lead:
        turns.append({"role": "user", "content": lead})
    for tag, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if tag == "Human" else "assistant"
        content = content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = (turns[-1]["content"] + "\n" + content).strip()
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def strip_stop(text: str, template: str) -> str:
    """Cut a generated answer at the start of a new turn (plain format) and trim it."""
    if template == "plain":
        for stop in (PLAIN_STOP, "\nHuman:"):
            i = text.find(stop)
            if i >= 0:
                text = text[:i]
    return text.strip()
