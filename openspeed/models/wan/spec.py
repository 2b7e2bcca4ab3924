"""Registers the Wan DiT with the model registry, keyed by diffusers' ``_class_name``."""

from __future__ import annotations

from openspeed.errors import ConfigError
from openspeed.models.registry import ModelSpec, register_model
from openspeed.models.wan.config import DIFFUSERS_CLASS_NAME, MODEL_NAME, ROPE_THETA, WanConfig
from openspeed.models.wan.convert import hf_to_native, native_module_to_diffusers, native_to_hf
from openspeed.models.wan.family import PARTS
from openspeed.models.wan.flops import training_flops
from openspeed.models.wan.memory_plan import memory_plan
from openspeed.models.wan.model import WanTransformer, reset_non_persistent_buffers
from openspeed.models.wan.parallelize import parallelize
from openspeed.models.wan.task import WanFlowMatchingTask

# Default std of a normal weight initialisation (the Wan reference initialises its embeddings with it).
INIT_STD = 0.02


def export_run(run_dir_or_checkpoint: str, out_dir: str, *, to: str | None = None, merge_lora: bool = False,
               ema: bool | None = None, max_shard_size_bytes: int = 2_000_000_000) -> str:
    """``openspeed convert`` of a Wan run: a diffusers transformer folder (``--to hf``, or
    ``--merge-lora``) or, for a LoRA run, its adapter in peft's format."""
    from openspeed.models.wan.export import export_wan

    done = export_wan(run_dir_or_checkpoint, out_dir, merge_lora=merge_lora, ema=True if ema else None,
                      max_shard_size_bytes=max_shard_size_bytes)
    what = "LoRA adapter (peft format)" if done["kind"] == "adapter" else "diffusers transformer"
    return f"wrote a {what} of step {done['step']} to {done['out']}"


def init_std(config: WanConfig) -> float:
    """Default init std (the DiT has no ``initializer_range``)."""
    return INIT_STD


def set_rope_theta(config: WanConfig, theta: float) -> None:
    """Wan's RoPE base is fixed (10000, as in diffusers and the released checkpoints)."""
    if float(theta) != ROPE_THETA:
        raise ConfigError(f"model.rope_theta={theta}: wan's 3-D RoPE base is fixed at {ROPE_THETA:g}")


def part_of(name: str) -> str:
    """Freezable part of a native parameter (``patch_embed``, ``condition_embed``, ``blocks``, ``head``)."""
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise KeyError(f"parameter {name} belongs to no part of the wan DiT")


WAN_SPEC = ModelSpec(
    name=MODEL_NAME,
    hf_model_types=(DIFFUSERS_CLASS_NAME,),
    hf_architecture=DIFFUSERS_CLASS_NAME,
    config_from_hf=WanConfig.from_hf_dict,
    config_to_hf=WanConfig.to_hf_dict,
    build=WanTransformer,
    hf_to_native=hf_to_native,
    native_to_hf=native_to_hf,
    flops=training_flops,
    reset_buffers=reset_non_persistent_buffers,
    init_std=init_std,
    set_rope_theta=set_rope_theta,
    part_of=part_of,
    parallelize=parallelize,
    task=WanFlowMatchingTask,
    memory_plan=memory_plan,
    module_name_to_ref=native_module_to_diffusers,
    export=export_run,
)

register_model(WAN_SPEC)
