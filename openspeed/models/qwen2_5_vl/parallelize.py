"""Qwen2.5-VL (and Qwen2-VL) parallel plan, applied from outside the model (the model file has no distributed code).

Order (fixed, as torchtitan documents it): tensor parallel -> context parallel -> recomputation ->
FSDP2. Tensor (+ sequence) parallelism, context parallelism and FSDP2 / HSDP over the data-parallel
dims are applied here, to the whole model or (tp, FSDP) to one pipeline stage (``pipeline.py`` cuts
the stages first).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from openspeed.distributed.context_parallel import ContextParallel
from openspeed.distributed.context_parallel.modules import route_attention, shard_inputs, split_packed_stack
from openspeed.distributed.fsdp import apply_fsdp
from openspeed.distributed.mesh import ParallelDims
from openspeed.distributed.tensor_parallel import (
    FusedColwiseParallel,
    ReplicateParallel,
    apply_plan,
    attention_plan,
    check_divisible,
    gather_sequence_input,
    mark_vocab_parallel,
    mlp_plan,
    plain_loss_output,
    sequence_parallel_norm,
    shard_sequence_input,
    vocab_parallel_embedding,
    vocab_parallel_head,
)
from openspeed.lora.layer import lora_modules
from openspeed.lora.parallel import lora_plan
from openspeed.memory.apply import apply_memory_config
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from openspeed.models.qwen2_5_vl.memory_plan import memory_plan
from openspeed.models.qwen2_5_vl.model import next_token_targets

# Positional args of DecoderLayer / TextAttention: (x, cos, sin, attention_mask).
_TEXT_BLOCK_ARGS = 4


def check_tensor_parallel_sizes(config: Qwen2_5_VLConfig, tp: int) -> None:
    """One-line :class:`ConfigError` naming the first split size that ``tp`` does not divide."""
    if tp <= 1:
        return
    text, vision = config.text, config.vision
    check_divisible(
        tp,
        (
            ("text num_attention_heads", text.num_attention_heads),
            ("text num_key_value_heads", text.num_key_value_heads),
            ("text intermediate_size", text.intermediate_size),
            ("text vocab_size", text.vocab_size),
            ("vision num_heads", vision.num_heads),
            ("vision intermediate_size", vision.intermediate_size),
            ("vision merger width (hidden_size*spatial_merge_size^2)",
             vision.hidden_size * vision.spatial_merge_size**2),
        ),
    )


def _vision_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    if getattr(model, "visual", None) is None:
        return {}  # a pipeline stage without the vision tower
    plan: dict[str, ParallelStyle] = {"visual.patch_embed": ReplicateParallel()}
    for i in range(len(model.visual.blocks)):
        block = f"visual.blocks.{i}"
        plan[f"{block}.norm1"] = ReplicateParallel()
        plan[f"{block}.norm2"] = ReplicateParallel()
        # qkv rows are [q; k; v] (HF layout): each rank takes its heads of all three.
        plan[f"{block}.attn.qkv"] = FusedColwiseParallel(3)
        plan[f"{block}.attn.proj"] = RowwiseParallel()
        # SwiGLU (Qwen2.5-VL) or fc1 -> activation -> fc2 (Qwen2-VL).
        gated = hasattr(model.visual.blocks[i].mlp, "gate_proj")
        names = ("gate_proj", "up_proj", "down_proj") if gated else (None, "fc1", "fc2")
        for name, style in mlp_plan(*names, sequence_parallel=False).items():
            plan[f"{block}.mlp.{name}"] = style
    # The merger: Linear -> GELU -> Linear, split column then row.
    plan["visual.merger.ln_q"] = ReplicateParallel()
    plan["visual.merger.mlp.0"] = ColwiseParallel()
    plan["visual.merger.mlp.2"] = RowwiseParallel()
    return plan


def text_plan(model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The decoder's plan; a pipeline stage gets the parts it holds (it keeps the full model's names)."""
    sp = sequence_parallel
    text = model.language_model
    has_head = getattr(model, "lm_head", None) is not None
    plan: dict[str, ParallelStyle] = {}
    # The embedding output stays a plain replicated tensor: embed_inputs scatters vision features
    # into it. Sequence sharding starts at each decoder layer's input (a no-op after the first).
    if getattr(text, "embed_tokens", None) is not None:
        plan["language_model.embed_tokens"] = vocab_parallel_embedding()
    norm = sequence_parallel_norm if sp else ReplicateParallel
    # named_children: a pipeline stage's layers keep their full-model indices.
    layer_names = [name for name, _ in text.layers.named_children()]
    for index in layer_names:
        layer = f"language_model.layers.{index}"
        if sp:
            # A stage without the head sends plain full hidden states to the next stage.
            last_of_stage = index == layer_names[-1] and not has_head
            plan[layer] = shard_sequence_input(_TEXT_BLOCK_ARGS, gather_output=last_of_stage)
            plan[f"{layer}.self_attn"] = gather_sequence_input(_TEXT_BLOCK_ARGS)
            plan[f"{layer}.mlp"] = gather_sequence_input(1)
        plan[f"{layer}.input_layernorm"] = norm()
        plan[f"{layer}.post_attention_layernorm"] = norm()
        attn = attention_plan("q_proj", "k_proj", "v_proj", "o_proj", sequence_parallel=sp)
        for name, style in attn.items():
            plan[f"{layer}.self_attn.{name}"] = style
        for name, style in mlp_plan("gate_proj", "up_proj", "down_proj", sequence_parallel=sp).items():
            plan[f"{layer}.mlp.{name}"] = style
    if getattr(text, "norm", None) is not None:
        plan["language_model.norm"] = norm()
    if has_head:
        plan["lm_head"] = vocab_parallel_head(Shard(1) if sp else Replicate())
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, *,
                          vision_plan=_vision_plan, check=check_tensor_parallel_sizes) -> nn.Module:
    """Split a Qwen2.5-VL model (meta or materialised) over the 1-D ``tp_mesh``, in place.

    Every parameter becomes a DTensor on ``tp_mesh`` (split ones ``Shard``, the rest ``Replicate``)
    with its global shape and name unchanged. Outputs: ``logits`` is a DTensor sharded on the
    vocabulary (read it with ``full_logits``), ``loss`` a plain scalar; run the forward and backward
    inside ``loss_context(model)``. Weights must be (re-)initialised or loaded afterwards with
    ``copy_full_into`` (as ``build_training_model`` does).

    LoRA adapters (:class:`~openspeed.lora.LoRALinear` layers, added before this) are split with
    their base layer (``openspeed/lora/parallel.py``).

    Also takes a pipeline stage module (``pipeline.Qwen2_5_VLStage``): only the parts it holds are
    planned, and a stage without ``lm_head`` returns plain full hidden states under sequence
    parallelism (what goes to the next stage).

    ``vision_plan`` (model -> plan of the vision side) and ``check`` (config, tp) are another
    family's when it shares this decoder (LLaVA).
    """
    check(model.config, tp_mesh.size())
    plan = {**vision_plan(model), **text_plan(model, sequence_parallel)}
    if lora_modules(model):
        # Adapted layers (model.lora) keep their base layer's layout; the adapters split beside it.
        plan = lora_plan(model, plan)
    apply_plan(model, tp_mesh, plan)
    # embed_tokens and lm_head are both sharded on the vocabulary (dim 0 of the shared weight), so a
    # tied pair stays valid: re-point lm_head at the (now distributed) embedding weight.
    model.tie_weights()
    if getattr(model, "lm_head", None) is not None:
        mark_vocab_parallel(model)
        plain_loss_output(model)
    return model


def apply_context_parallel(model: nn.Module, cp: ContextParallel, split_vision: bool = True) -> nn.Module:
    """Split the language model's sequence and the vision tower's patches over the cp group, in place
    (hooks; no model change).

    The vision tower's blocks run on this rank's share of all images' patches (Ulysses over the
    packed patches, whatever the text algorithm; a patch count the group cannot split runs whole)
    and the merger gets every patch back. The embedding and the M-RoPE positions are computed on the
    whole sequence on every cp rank (they need all image tokens); the decoder stack then gets this rank's tokens of
    the embeddings, positions and padding mask, its attention runs the cp algorithm, and the head
    and loss see only local tokens. The labels are turned into next-token targets on the whole
    sequence first (the shift crosses shard boundaries) and split the same way, so each rank's loss
    is its tokens' share of the global sum. Packed batches keep their global ``cu_seqlens``.
    """
    shard_inputs(model.language_model, cp, {"inputs_embeds": 1, "position_ids": 2, "attention_mask": 1})
    for layer in model.language_model.layers:
        route_attention(layer.self_attn, cp)

    def to_targets(bound: dict) -> dict:
        labels = bound.pop("labels", None)
        if labels is not None:
            bound["shift_labels"] = next_token_targets(labels, bound.get("cu_seqlens"))
        return bound

    shard_inputs(model, cp, {"shift_labels": 1}, transform=to_targets)
    if not split_vision:
        return model

    # The vision tower's patches (all images of the batch, packed) split with Ulysses: its blocks
    # are per-token except attention, whose windows / frames come from the global cu_seqlens.
    visual = model.visual
    vision_cp = cp if cp.algo == "ulysses" else ContextParallel.from_group(cp.group, "ulysses")
    split_packed_stack(
        visual,
        list(visual.blocks),
        [block.attn for block in visual.blocks],
        visual.merger,
        vision_cp,
        total_len=lambda args, kwargs: (args[0] if args else kwargs["pixel_values"]).shape[0],
    )
    return model


def parallelize(model: nn.Module, dims: ParallelDims, cfg, *, vision_plan=_vision_plan,
                check=check_tensor_parallel_sizes, split_vision: bool = True, memory=memory_plan) -> nn.Module:
    """Apply the run's parallel layout to a Qwen2.5-VL model built on the meta device.

    LoRA adapters, when the run has them, are already in the model: tensor parallel splits them with
    their base layers and FSDP2 shards them like every other parameter of their block. The keyword
    arguments let a family that shares the decoder bring its vision side (LLaVA): its tensor-parallel
    plan and size check, whether context parallelism splits it, and its memory plan.
    """
    if dims.sizes.get("tp", 1) > 1:
        apply_tensor_parallel(model, dims.mesh["tp"], bool(cfg.parallel.sequence_parallel),
                              vision_plan=vision_plan, check=check)
    if dims.cp_size > 1:
        apply_context_parallel(model, dims.context_parallel(), split_vision=split_vision)
    if getattr(cfg, "memory", None) is not None:
        apply_memory_config(model, cfg.memory, memory(model))
    if dims.fsdp_enabled:
        # One FSDP unit per transformer block (vision and language), the root keeps the rest:
        # patch embed, merger, embeddings, final norm and head.
        # A pipeline stage lists the blocks it holds.
        fsdp_blocks = getattr(model, "fsdp_blocks", None)
        blocks = fsdp_blocks() if callable(fsdp_blocks) else [*model.visual.blocks, *model.language_model.layers]
        apply_fsdp(model, dims.dp_mesh(), blocks, zero_stage=cfg.parallel.zero_stage,
                   precision=cfg.train.precision)
    return model
