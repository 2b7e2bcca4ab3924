"""Native Wan2.1 diffusion transformer (text-to-video and image-to-video), as in the Wan paper.

A video latent ``(batch, channels, frames, height, width)`` is cut into 3-D patches (a strided
Conv3d) and becomes a token sequence. Each block runs

    self-attention over all video tokens (RMS-normed q/k, 3-D RoPE over frame/height/width),
    cross-attention to the text tokens (and, for I2V, to the CLIP image tokens through extra K/V),
    a GELU(tanh) feed-forward network,

with the self-attention and the feed-forward wrapped in adaLN modulation: the timestep embedding is
projected once to six vectors (shift, scale, gate for each of the two), and every block adds its own
learned ``modulation`` table to them. The output is a modulated LayerNorm, a linear projection back to
patch pixels, and the inverse of the patching.

Plain PyTorch, no distributed code. Numerics (fp32 islands, casts, norm epsilons) follow diffusers'
``WanTransformer3DModel``; parameter names are this file's own (see ``convert.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from openspeed.models.layers.mlp import get_activation
from openspeed.models.wan.config import ROPE_THETA, TEXT_CONTEXT_LENGTH, WanConfig
from openspeed.ops.attention import attention

# LayerNorm epsilon of the CLIP image-embedding projection (torch's default; not in the config).
IMAGE_NORM_EPS = 1e-5
# Period of the sinusoidal timestep embedding.
TIMESTEP_MAX_PERIOD = 10000


@dataclass
class WanOutput:
    """Model output: ``sample`` shaped like the input latent, with ``out_channels`` channels."""

    sample: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights too), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x``."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class FeedForward(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))``.

    ``act`` uses Hugging Face ``hidden_act`` spelling: ``gelu_pytorch_tanh`` in the blocks and the text
    embedding, exact ``gelu`` on the image path, ``silu`` for the timestep embedding.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.act_name = act
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension of ``x``."""
        return self.fc2(self.act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 ``[cos, sin]`` embedding (N, dim) of the (N,) ``timestep``, periods up to 10000."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
    angles = timestep[:, None].float() * torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * steps / half)[None, :]
    emb = torch.cat((angles.cos(), angles.sin()), dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --------------------------------------------------------------------------------------------------
# 3-D rotary position embedding
# --------------------------------------------------------------------------------------------------


def _axis_angles(dim: int, max_len: int, theta: float) -> torch.Tensor:
    """(max_len, dim / 2) rotation angles of positions ``0..max_len-1``, in float64 on the CPU."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    positions = torch.arange(max_len, dtype=torch.float64, device="cpu")
    return torch.outer(positions, inv_freq)


class WanRotaryEmbedding(nn.Module):
    """Cos/sin tables of Wan's 3-D RoPE.

    The head dimension is cut into three parts rotated by the frame, row and column index of a patch
    (``WanConfig.rope_axis_dims``); channels rotate in adjacent pairs ``(2i, 2i+1)``. Angles are
    computed in float64 and stored in fp32, in non-persistent buffers: ``(rope_max_seq_len,
    head_dim / 2)`` with the frame, row and column frequencies side by side.
    """

    def __init__(self, axis_dims: tuple[int, int, int], max_seq_len: int, theta: float = ROPE_THETA) -> None:
        super().__init__()
        self.axis_dims = tuple(axis_dims)
        self.max_seq_len = max_seq_len
        self.theta = theta
        cos, sin = self._tables()
        self.register_buffer("cos", cos.to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin", sin.to(torch.get_default_device()), persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.cat([_axis_angles(d, self.max_seq_len, self.theta) for d in self.axis_dims], dim=1)
        return angles.cos().float(), angles.sin().float()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the tables (e.g. after ``to_empty``); defaults to the buffers' current device."""
        if device is None:
            device = torch.device("cpu") if self.cos.is_meta else self.cos.device
        cos, sin = self._tables()
        self.cos, self.sin = cos.to(device), sin.to(device)

    @torch.no_grad()
    def forward(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape (frames*height*width, head_dim / 2) for a patch grid, row-major."""
        if max(frames, height, width) > self.max_seq_len:
            raise ValueError(
                f"latent patch grid {frames}x{height}x{width} exceeds rope_max_seq_len {self.max_seq_len}"
            )
        sizes = [d // 2 for d in self.axis_dims]
        out = []
        for table in (self.cos, self.sin):
            f, h, w = table.split(sizes, dim=1)
            grid = torch.cat(
                (
                    f[:frames, None, None, :].expand(frames, height, width, -1),
                    h[None, :height, None, :].expand(frames, height, width, -1),
                    w[None, None, :width, :].expand(frames, height, width, -1),
                ),
                dim=-1,
            )
            out.append(grid.reshape(frames * height * width, -1))
        return out[0], out[1]

    def extra_repr(self) -> str:
        return f"axis_dims={self.axis_dims}, max_seq_len={self.max_seq_len}, theta={self.theta}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` (batch, seq, heads, head_dim) by (seq, head_dim/2) angles.

    Computed in fp32 (the tables' dtype) and cast back to ``x``'s dtype.
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads*head_dim) -> (batch, seq, heads, head_dim).

    Split by the head width, not the head count, so a module whose projections hold only some of the
    heads (tensor parallelism) splits its share correctly.
    """
    return x.unflatten(-1, (-1, head_dim))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) attention on (batch, seq, heads, dim) tensors; returns (batch, seq, heads*dim)."""
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Self-attention over the video tokens with RMS QK-norm (across all heads) and 3-D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim, eps=eps)
        self.k_norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, seq, dim); ``cos``/``sin``: (seq, head_dim / 2)."""
        q = apply_rope(_heads(self.q_norm(self.q_proj(x)), self.head_dim), cos, sin)
        k = apply_rope(_heads(self.k_norm(self.k_proj(x)), self.head_dim), cos, sin)
        v = _heads(self.v_proj(x), self.head_dim)
        return self.o_proj(_attend(q, k, v))


class CrossAttention(nn.Module):
    """Cross-attention from the video tokens to the text tokens (no RoPE).

    With ``image_kv_dim`` (Wan2.1 I2V) the image tokens get their own K/V projections and K norm; the
    queries attend to text and to image tokens separately and the two results are summed before the
    output projection.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, image_kv_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim, eps=eps)
        self.k_norm = nn.RMSNorm(dim, eps=eps)
        self.has_image_kv = image_kv_dim is not None
        if self.has_image_kv:
            self.image_k_proj = nn.Linear(image_kv_dim, dim)
            self.image_v_proj = nn.Linear(image_kv_dim, dim)
            self.image_k_norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (batch, seq, dim) queries; ``text``/``image``: (batch, tokens, dim) contexts."""
        q = _heads(self.q_norm(self.q_proj(x)), self.head_dim)
        k = _heads(self.k_norm(self.k_proj(text)), self.head_dim)
        v = _heads(self.v_proj(text), self.head_dim)
        out = _attend(q, k, v)
        # Zero image tokens contribute nothing (diffusers' attention over zero keys gives zeros too).
        if self.has_image_kv and image is not None and image.shape[1] > 0:
            k_img = _heads(self.image_k_norm(self.image_k_proj(image)), self.head_dim)
            v_img = _heads(self.image_v_proj(image), self.head_dim)
            out = out + _attend(q, k_img, v_img)
        return self.o_proj(out)


# --------------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------------


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated feed-forward.

    ``modulation`` (1, 6, dim) is added to the shared timestep projection to give, in this order,
    shift / scale / gate of the self-attention and shift / scale / gate of the feed-forward. Norms,
    modulation and the gated residual adds run in fp32; the residual stream stays in the input dtype.
    """

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.eps
        self.self_attn_norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_attention_heads, eps)
        self.cross_attn_norm = FP32LayerNorm(dim, eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_attention_heads, eps, config.added_kv_proj_dim)
        self.ffn_norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, config.ffn_dim, dim, act="gelu_pytorch_tanh")
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None,
        time_modulation: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """``x``: (batch, seq, dim); ``time_modulation``: (batch, 1 or seq, 6, dim)."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            self.modulation + time_modulation.float()
        ).unbind(-2)

        h = (self.self_attn_norm(x.float()) * (1 + scale_sa) + shift_sa).type_as(x)
        x = (x.float() + self.self_attn(h, cos, sin) * gate_sa).type_as(x)

        h = self.cross_attn_norm(x.float()).type_as(x)
        x = x + self.cross_attn(h, text, image)

        h = (self.ffn_norm(x.float()) * (1 + scale_ff) + shift_ff).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_ff).type_as(x)


# --------------------------------------------------------------------------------------------------
# Condition embeddings
# --------------------------------------------------------------------------------------------------


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, GELU MLP, LayerNorm (all norms with affine).

    With ``pos_embed_seq_len`` (first-last-frame model) the two frames' tokens, stacked on the batch
    axis, are laid side by side and a learned position embedding is added first.
    """

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None = None) -> None:
        super().__init__()
        self.norm_in = FP32LayerNorm(image_dim, IMAGE_NORM_EPS)
        self.ffn = FeedForward(image_dim, image_dim, dim, act="gelu")
        self.norm_out = FP32LayerNorm(dim, IMAGE_NORM_EPS)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, image_dim) -> (batch, tokens, dim)."""
        if self.pos_embed is not None:
            _, tokens, width = image_tokens.shape
            image_tokens = image_tokens.reshape(-1, 2 * tokens, width) + self.pos_embed
        return self.norm_out(self.ffn(self.norm_in(image_tokens)))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """Wan2.1 DiT: takes the same keyword inputs as diffusers' ``WanTransformer3DModel.forward``."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        self.rope = WanRotaryEmbedding(config.rope_axis_dims, config.rope_max_seq_len)
        self.patch_embed = nn.Conv3d(config.in_channels, dim, kernel_size=patch, stride=patch)

        self.time_embed = FeedForward(config.freq_dim, dim, dim, act="silu")
        self.time_modulation = nn.Linear(dim, 6 * dim)
        self.text_embed = FeedForward(config.text_dim, dim, dim, act="gelu_pytorch_tanh")
        self.image_embed = None
        if config.image_dim is not None:
            self.image_embed = ImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len)

        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))

        self.out_norm = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.out_proj = nn.Linear(dim, config.out_channels * config.patch_volume)
        self.out_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def embed_timestep(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep embedding (batch, n, dim) in ``dtype`` and its modulation (batch, n, 6, dim).

        ``timestep`` is (batch,) (n = 1) or one per token (batch, seq) (n = seq, Wan2.2 TI2V).
        """
        per_token = timestep.ndim == 2
        sinusoid = timestep_sinusoid(timestep.flatten(), self.config.freq_dim)
        sinusoid = sinusoid.unflatten(0, (timestep.shape[0], -1 if per_token else 1))
        sinusoid = sinusoid.to(self.time_embed.fc1.weight.dtype)
        temb = self.time_embed(sinusoid).to(dtype)
        modulation = self.time_modulation(F.silu(temb)).unflatten(-1, (6, -1))
        return temb, modulation

    def split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(text, image)`` context of the cross-attention from ``[image tokens; text tokens]``.

        With image K/V projections the last 512 tokens (the text encoder's context length, hardcoded
        as in diffusers) are text and all tokens before them image; without, everything is text.
        """
        if not self.config.has_image_kv:
            return context, None
        num_image = max(context.shape[1] - TEXT_CONTEXT_LENGTH, 0)
        return context[:, num_image:], context[:, :num_image]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> WanOutput | tuple[torch.Tensor]:
        """Predict the flow (or noise) for a noisy video latent.

        Args:
            hidden_states: (batch, in_channels, frames, height, width) latent; each of the last three
                must be a multiple of the patch size.
            timestep: (batch,) diffusion timesteps (a scalar is broadcast), or (batch, seq) per token.
            encoder_hidden_states: (batch, text_tokens, text_dim) text-encoder output (512 tokens for
                the released models; I2V relies on it, see :meth:`split_context`).
            encoder_hidden_states_image: (batch, image_tokens, image_dim) CLIP image embeddings (I2V).
            return_dict: ``False`` returns the 1-tuple ``(sample,)`` as diffusers does.
            attention_kwargs: accepted for diffusers compatibility; must be empty (no LoRA scale here).

        Returns:
            :class:`WanOutput` with ``sample`` (batch, out_channels, frames, height, width).
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs are not supported, got {sorted(attention_kwargs)}")
        cfg = self.config
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = cfg.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"latent {frames}x{height}x{width} is not a multiple of patch_size {cfg.patch_size}"
            )
        grid = (frames // p_t, height // p_h, width // p_w)
        cos, sin = self.rope(*grid)

        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (batch, seq, dim)

        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.ndim == 2 and timestep.shape[1] != x.shape[1]:
            raise ValueError(f"per-token timestep has {timestep.shape[1]} entries for {x.shape[1]} tokens")
        temb, time_modulation = self.embed_timestep(timestep, encoder_hidden_states.dtype)

        context = self.text_embed(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            if self.image_embed is None:
                raise ValueError("encoder_hidden_states_image given, but this model has no image_dim")
            context = torch.cat((self.image_embed(encoder_hidden_states_image), context), dim=1)
        text, image = self.split_context(context)

        for block in self.blocks:
            x = block(x, text, image, time_modulation, cos, sin)

        shift, scale = (self.out_modulation + temb.unsqueeze(-2)).unbind(-2)
        x = (self.out_norm(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.out_proj(x)
        sample = self.unpatchify(x, grid)
        return WanOutput(sample=sample) if return_dict else (sample,)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(batch, seq, out_channels * patch_volume) -> (batch, out_channels, frames, height, width)."""
        f, h, w = grid
        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (batch, channels, f, p_t, h, p_h, w, p_w)
        return x.reshape(x.shape[0], x.shape[1], f * p_t, h * p_h, w * p_w)


def reset_non_persistent_buffers(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Refill the rotary tables after ``to_empty`` or a ``meta``-device ``load_state_dict(assign=True)``.

    ``device`` defaults to the device of the model's first parameter.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None and not first.is_meta else torch.device("cpu")
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset(device)
