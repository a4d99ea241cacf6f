"""The Alpaca prompt templates of the released ImageBind-LLM demo (``llama.format_prompt``).

A leaf module: generation wraps prompts in them, and the tiny tokenizer's corpus includes them so
that they tokenise into few pieces.
"""

from __future__ import annotations

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002
    """The Alpaca template of the released demo (``llama.format_prompt``)."""
    if not input:
        return PROMPT_NO_INPUT.format_map({"instruction": instruction})
    return PROMPT_INPUT.format_map({"instruction": instruction, "input": input})
