"""A chat conversation as the released ImageBind-LLM prompt (the Alpaca templates of
``inject.prompts``).

- The last message must be the user's: its text is the template's ``### Instruction``.
- System (and developer) messages, then the earlier turns as ``User: ...`` / ``Assistant: ...``
  lines, are the template's ``### Input`` context, separated by a blank line.
- Without either, the prompt is exactly the one ``/v1/generate`` builds from the same text.
- Media parts carry no text: every medium of the conversation goes into the one visual feature
  the adapter takes (their equal-weight mix, cache-blended), whichever turn holds it.
"""

from __future__ import annotations

from cachebind.inject.llava_prompt import Turn, render_turns
from cachebind.inject.prompts import format_prompt
from cachebind.serve.openai.errors import invalid
from cachebind.serve.openai.schemas import ImagePart, Message, TextPart

SPEAKERS = {"user": "User", "assistant": "Assistant"}


def text_of(message: Message) -> str:
    """The text of a message: its string, or its text parts joined by newlines."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def check_last(messages: list[Message]) -> str:
    """Refuse a conversation that does not end with the user's message; its place."""
    last = messages[-1]
    where = f"messages[{len(messages) - 1}]"
    if last.role != "user":
        raise invalid(
            "last_message_not_user",
            f"{where} is a {last.role!r} message; the conversation must end with the user's",
            f"{where}.role",
        )
    return where


def render_llava_chat(messages: list[Message]) -> str:
    """The prompt of a conversation in llava mode: LLaVA-1.5's chat template (llava-hf's),
    each image an ``<image>`` at the head of its message, in order of appearance."""
    where = check_last(messages)
    last = messages[-1]
    images = [isinstance(p, ImagePart) for p in last.content or [] if not isinstance(p, str)]
    if not text_of(last).strip() and not any(images):
        raise invalid("empty_instruction", f"{where} has no text and no image", where)
    turns = []
    for m in messages:
        parts = m.content if isinstance(m.content, list) else []
        count = sum(isinstance(p, ImagePart) for p in parts)
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        if isinstance(m.content, str):
            texts = [m.content]
        role = "system" if m.role == "developer" else m.role
        turns.append(Turn(role, texts, count))
    return render_turns(turns)


def render_chat(messages: list[Message]) -> str:
    """The prompt of a conversation (see the module's rules)."""
    where = check_last(messages)
    last = messages[-1]
    instruction = text_of(last)
    if not instruction.strip():
        raise invalid(
            "empty_instruction",
            f"{where} has no text; add a text part saying what to do with its media",
            f"{where}.content",
        )
    system = [text_of(m) for m in messages[:-1] if m.role in ("system", "developer")]
    turns = [f"{SPEAKERS[m.role]}: {text_of(m)}" for m in messages[:-1] if m.role in SPEAKERS]
    context = [block for block in ("\n\n".join(system), "\n".join(turns)) if block.strip()]
    return format_prompt(instruction, "\n\n".join(context) or None)
