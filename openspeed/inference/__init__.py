"""Inference helpers for native models: batched decoding (greedy or sampled) and prompt-only samples."""

from openspeed.inference.generate import (
    build_prompt_sample,
    filter_logits,
    generate,
    greedy_generate,
    next_tokens,
)

__all__ = ["build_prompt_sample", "filter_logits", "generate", "greedy_generate", "next_tokens"]
