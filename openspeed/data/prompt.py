"""Prompt rendering for generation, exactly as ``ConversationDataset`` renders training data.

A model fine-tuned on ``<|im_start|>assistant\\n<answer><|im_end|>`` must be prompted with the same
token prefix it saw in training, so this module reuses the dataset's renderer
(:func:`render_conversation`) and expands ``<image>``/``<video>`` tags the same way
(``<|vision_start|>`` + one pad token per merged patch + ``<|vision_end|>``). The sample builder that
adds pixels and token ids is :func:`openspeed.inference.generate.build_prompt_sample`.
"""

from __future__ import annotations

from typing import Any

from openspeed.data.conversation import normalize_messages, render_conversation

ASSISTANT_PREFIX = "<|im_start|>assistant\n"


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Render normalised messages (ending with a user turn) plus the opening of the assistant turn."""
    text, _ = render_conversation(messages)
    return text + ASSISTANT_PREFIX


def normalize_prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Validate and normalise prompt messages (role/content or ShareGPT from/value).

    The dataset's validator insists on an assistant reply, so a placeholder reply is appended for
    the check and removed again. Raises ``ValueError`` when the prompt does not end with a user turn
    (generation would otherwise continue someone else's turn).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("prompt must be a non-empty list of messages")
    first = messages[0]
    spelling_sharegpt = isinstance(first, dict) and "from" in first
    if spelling_sharegpt:
        record = {"conversations": [*messages, {"from": "gpt", "value": ""}]}
    else:
        record = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    normalized = normalize_messages(record)[:-1]
    if normalized[-1]["role"] != "user":
        raise ValueError(f"prompt must end with a user turn, not {normalized[-1]['role']!r}")
    return normalized
