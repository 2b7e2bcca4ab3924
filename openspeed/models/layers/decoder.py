"""The decoder-only language model shared by the VLM families: Qwen2 (Qwen2-VL, Qwen2.5-VL) and
Llama (LLaVA) are the same pre-norm stack of grouped-query attention and a SwiGLU MLP; they differ in
which projections carry a bias (``cfg.qkv_bias``, ``cfg.o_bias``, ``cfg.mlp_bias``) and in the
rotary positions. The rotary is M-RoPE over (3, batch, seq) positions: with its three rows equal
(text) it is the plain 1-D RoPE, which is what Llama uses.

``cfg`` is a text config with ``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``hidden_act``, ``rms_norm_eps``, ``rope_theta``, ``mrope_section``, ``pad_token_id`` and the three
bias flags (:class:`openspeed.models.qwen2_5_vl.config.TextConfig`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from openspeed.models.layers.kv_cache import KVCache, LayerKV
from openspeed.models.layers.mlp import SwiGLUMLP
from openspeed.models.layers.norms import RMSNorm
from openspeed.models.layers.rope import MRopeEmbedding, apply_rotary
from openspeed.ops.attention import AttentionPlan, attention, attention_plan


class TextAttention(nn.Module):
    """Causal grouped-query attention with (M-)RoPE positions."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """``x``: (batch, seq, hidden); ``cos``/``sin``: (batch, seq, head_dim).

        ``cu_seqlens``: segment bounds of a packed row (batch 1); attention stays inside each segment.
        ``kv_cache``: this layer's cache; the new keys/values are appended to it and the queries attend
        to every cached token. ``attention_mask`` then covers the cached and the new tokens.
        ``plan``: the forward's attention plan of ``attention_mask`` / ``cu_seqlens`` (built by
        :class:`LanguageModel` once for all layers); without it the call builds its own.
        """
        b, s, _ = x.shape
        # Head counts from the projections (-1), so a tensor-parallel rank's head shard works too.
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin, unsqueeze_dim=1)
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            if k.shape[2] != s:
                # A decode step: one new query per row, after every cached key, so causal masking
                # hides nothing (the padding mask over the keys still applies).
                if s != 1:
                    raise ValueError(f"with a filled KV cache a forward takes one new token per row, got {s}")
                causal = False
        if plan is None:
            plan = attention_plan(attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        out = attention(q, k, v, causal=causal, scale=self.head_dim**-0.5, plan=plan)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: attention then SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, act=cfg.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """``x``: (batch, seq, hidden); ``cu_seqlens``, ``kv_cache`` and ``plan`` as in :class:`TextAttention`."""
        # cu_seqlens / kv_cache / plan go by keyword: tensor-parallel input hooks lay out the positional
        # args only.
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, attention_mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache, plan=plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """The decoder stack (embeddings, layers, final norm) driven by (3, batch, seq) rotary positions."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = MRopeEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """(batch, seq, hidden) embeddings and (3, batch, seq) positions -> final hidden states.

        ``cu_seqlens``: segment bounds of a packed row (batch 1); attention never crosses them.
        ``kv_cache``: keys/values of earlier tokens, extended by this call (see :class:`KVCache`).
        """
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        # One plan for every layer: the layout's metadata is derived once per forward. Built here, after
        # a context-parallel split of the inputs, so it holds what the layers see.
        plan = attention_plan(attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache.layer(i)
            x = layer(x, cos, sin, attention_mask, cu_seqlens=cu_seqlens, kv_cache=cache, plan=plan)
        return self.norm(x)
