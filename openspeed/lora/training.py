"""LoRA runs of registry models (Qwen2.5-VL): build the adapted model, and load a run's adapters back.

A LoRA run trains only the adapters; the base weights stay exactly what the run started from: the
HF weights of ``model.path``, or, when that directory has none, the weights drawn from
(``train.seed``, parameter name). Checkpoints therefore hold the adapters (and their optimizer
state) alone, and the base is rebuilt from the same source on resume and export.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from openspeed.config import VLM_LORA_TARGETS, WAN_LORA_TARGETS, RunConfig
from openspeed.distributed.mesh import ParallelDims
from openspeed.errors import CheckpointError, ConfigError
from openspeed.lora.layer import adapter_view, apply_lora, init_lora, is_lora_param, mark_only_lora_trainable
from openspeed.models.registry import ModelSpec


def lora_targets(cfg: RunConfig) -> list[str]:
    """``model.lora.targets``, the model family's default when left at the (Wan) default."""
    targets = list(cfg.model.lora.targets)
    return list(VLM_LORA_TARGETS) if targets == list(WAN_LORA_TARGETS) else targets


def hf_module_name(spec: ModelSpec):
    """Native module name -> Hugging Face module name for ``spec``'s model (None: names are the same).

    Targets may use either spelling, and peft adapters are written in the Hugging Face one.
    """
    from openspeed.models.qwen2_5_vl.config import MODEL_TYPE
    from openspeed.models.qwen2_5_vl.convert import native_module_to_hf

    return native_module_to_hf if spec.name == MODEL_TYPE else None


def add_adapters(model: nn.Module, spec: ModelSpec, cfg: RunConfig) -> list[str]:
    """Put ``model.lora``'s adapters into ``model`` (meta or materialised), in place; returns their names.

    A head tied to the input embedding is refused: its update could not be merged or exported apart
    from the embedding it shares its weight with.
    """
    lora = cfg.model.lora
    adapted = apply_lora(model, lora_targets(cfg), lora.rank, lora.alpha, alias=hf_module_name(spec),
                         dropout=lora.dropout)
    if "lm_head" in adapted and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise ConfigError("model.lora.targets: lm_head is tied to the input embedding (tie_word_embeddings); "
                          "leave it out")
    return adapted


def build_lora_training_model(
    cfg: RunConfig, dims: ParallelDims, device: torch.device
) -> tuple[list[nn.Module], ModelSpec, object, list[str]]:
    """``build_training_model`` with ``model.lora``'s adapters: this rank's parts, their spec and config,
    and the adapted module names.

    Order: meta build -> adapters -> only adapters trainable (``model.freeze`` freezes a part's
    adapters too) -> pipeline cut -> parallel plan (TP splits each adapter with its base layer, FSDP2
    shards it with its block) -> materialise -> base weights -> adapters initialised from
    (``train.seed``, name): ``A`` Kaiming-uniform, ``B`` zero, as peft does.
    """
    from openspeed.training.model_setup import (
        apply_freeze,
        cut_and_parallelize,
        load_base_weights,
        model_config_from_run,
    )

    spec, config = model_config_from_run(cfg)
    with torch.device("meta"):
        model = spec.build(config)
    adapted = add_adapters(model, spec, cfg)
    mark_only_lora_trainable(model)
    apply_freeze(model, spec, cfg.model.freeze)
    parts = cut_and_parallelize(model, spec, dims, cfg, device)
    load_base_weights(parts, spec, config, cfg, added=is_lora_param)
    for part in parts:
        init_lora(part, cfg.train.seed)
        part.train()
    return parts, spec, config, adapted


def run_config_of(run_dir_or_checkpoint: str) -> RunConfig:
    """The resolved config of a run (its directory or one of its checkpoints); ``CheckpointError`` if none."""
    from openspeed.training.run_loading import _read_run_config, _resolve

    run_dir, _ = _resolve(run_dir_or_checkpoint)
    return _read_run_config(run_dir)


def load_lora_run(run_dir_or_checkpoint: str, device: torch.device | str = "cpu"):
    """A LoRA run's model in one plain process: base weights as trained from, adapters from the checkpoint.

    Returns a :class:`~openspeed.training.run_loading.TrainedModel` (eval mode, fp32, unsharded) whose
    model still has its :class:`~openspeed.lora.LoRALinear` layers. Without a checkpoint the adapters
    are the initial ones (the base model). Raises :class:`CheckpointError` naming the path.
    """
    from openspeed.training.model_setup import load_base_weights, model_config_from_run
    from openspeed.training.run_loading import (
        RUN_CONFIG,
        TrainedModel,
        _read_run_config,
        _read_step,
        _resolve,
        load_dcp_model_state,
    )

    run_dir, checkpoint = _resolve(run_dir_or_checkpoint)
    cfg = _read_run_config(run_dir)
    if cfg.model.lora.rank < 1:
        raise CheckpointError(f"run {run_dir} has no LoRA adapters (model.lora.rank is 0)")
    try:
        spec, config = model_config_from_run(cfg)
        with torch.device("meta"):
            model = spec.build(config)
        add_adapters(model, spec, cfg)
    except ConfigError as e:
        raise CheckpointError(f"{os.path.join(run_dir, RUN_CONFIG)}: {e}") from None
    device = torch.device(device)
    model.to_empty(device=device)
    spec.reset_buffers(model, device)
    load_base_weights([model], spec, config, cfg, added=is_lora_param, announce=False)
    init_lora(model, cfg.train.seed)
    step = 0
    if checkpoint is not None:
        load_dcp_model_state(adapter_view(model), checkpoint)
        step = _read_step(checkpoint)
    spec.reset_buffers(model, device)
    return TrainedModel(model.eval(), spec, config, cfg, run_dir, checkpoint, step)


__all__ = [
    "add_adapters",
    "build_lora_training_model",
    "hf_module_name",
    "load_lora_run",
    "lora_targets",
    "run_config_of",
]
