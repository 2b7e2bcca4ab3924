"""Inference helpers for native models: greedy decoding and prompt-only samples."""

from openspeed.inference.generate import build_prompt_sample, greedy_generate

__all__ = ["build_prompt_sample", "greedy_generate"]
