"""Build the training model: meta device -> parallel plan -> materialise -> init or load weights."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from openspeed.config import RunConfig
from openspeed.distributed.mesh import ParallelDims
from openspeed.errors import CheckpointError, ConfigError
from openspeed.models.init import init_weights
from openspeed.models.loading import (
    HFWeights,
    copy_local_into,
    has_hf_weights,
    hf_sources,
    model_config_from_run,
    model_dir,
    read_local,
)
from openspeed.models.registry import ModelSpec
from openspeed.training.compile import compile_blocks, compile_enabled


def apply_freeze(model: nn.Module, spec: ModelSpec, parts: list[str]) -> int:
    """Turn off gradients for the named parts; returns how many parameters were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(spec.part_of(name) == part for part in parts):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def build_training_model(
    cfg: RunConfig, dims: ParallelDims, device: torch.device
) -> tuple[list[nn.Module], ModelSpec, object, list[str]]:
    """This rank's model parts (the whole model, or its pipeline stages), parallelised and initialised;
    returns ``(parts, spec, config, adapted module names)``.

    Order: meta build -> LoRA adapters (``model.lora``; then only they train) -> ``model.freeze`` ->
    pipeline cut -> the family's parallel plan (TP splits each adapter with its base layer, memory
    savers, FSDP2 shards it with its block) -> materialise -> base weights -> adapters initialised
    from (``train.seed``, name): ``A`` Kaiming-uniform, ``B`` zero, as peft does. Every part keeps the
    full model's parameter names, so weights are initialised (from the seed and the name) or loaded
    identically under any layout.
    """
    from openspeed.lora import add_adapters, init_lora, is_lora_param, mark_only_lora_trainable

    spec, config = model_config_from_run(cfg)
    with torch.device("meta"):
        model = spec.build(config)
    adapted: list[str] = []
    if cfg.model.lora.rank > 0:
        adapted = add_adapters(model, spec, cfg.model.lora)
        mark_only_lora_trainable(model)
    apply_freeze(model, spec, cfg.model.freeze)
    parts = cut_and_parallelize(model, spec, dims, cfg, device)
    load_base_weights(parts, spec, config, cfg, added=is_lora_param if adapted else None)
    for part in parts:
        if adapted:
            init_lora(part, cfg.train.seed)
        part.train()
    return parts, spec, config, adapted


def cut_and_parallelize(
    model: nn.Module, spec: ModelSpec, dims: ParallelDims, cfg: RunConfig, device: torch.device
) -> list[nn.Module]:
    """This rank's parts of a meta-built model (its pipeline stages, or the model), parallelised,
    their transformer blocks compiled (``train.compile``), and materialised (uninitialised) on ``device``."""
    if dims.sizes["pp"] > 1:
        if spec.pipeline is None:
            raise ConfigError(f"parallel.pp={dims.sizes['pp']}: {spec.name} has no pipeline plan")
        parts = spec.pipeline.stage_modules(model, dims, cfg.parallel)
    else:
        parts = [model]
    compiled = compile_enabled(cfg, torch.device(device).type)
    for part in parts:
        spec.parallelize(part, dims, cfg)
        if compiled:
            compile_blocks(part, spec, cfg.train.compile_backend)
        part.to_empty(device=device)
        spec.reset_buffers(part, torch.device(device))
    return parts


def load_base_weights(
    parts: list[nn.Module], spec: ModelSpec, config, cfg: RunConfig,
    added: Callable[[str], bool] | None = None, announce: bool | None = None,
) -> None:
    """The weights a run starts from: ``model.path``'s HF weights, or drawn from (``train.seed``, name).

    ``added`` names parameters the HF weights do not have (e.g. LoRA adapters), left to their own
    initialisation when weights are loaded. ``announce`` (default: on rank 0) prints the seeded case.
    """
    path = model_dir(cfg.model.path)
    if has_hf_weights(path):
        load_weights_into(parts, spec, config, path, added=added)
        return
    std = cfg.model.init_std if cfg.model.init_std is not None else spec.init_std(config)
    if announce is None:
        announce = int(os.environ.get("RANK", "0")) == 0
    if announce:
        print(f"{cfg.model.path} has no weights: initialising from seed {cfg.train.seed} (std {std})",
              file=sys.stderr)
    for part in parts:
        init_weights(part, cfg.train.seed, std)


def load_weights_into(parts: nn.Module | list[nn.Module], spec: ModelSpec, config, path: str,
                      added: Callable[[str], bool] | None = None) -> int:
    """Copy HF-format weights into a (possibly sharded) native model, one tensor at a time; returns the
    checkpoint bytes this rank read.

    ``parts``: the model, or this rank's pipeline stages; every weight must find a home in the full
    model, and every parameter of the given parts must find its weight, except those ``added``
    names (e.g. LoRA adapters added to the model, initialised separately). Each rank reads only the
    slices its parameters hold (a DTensor's local shard: FSDP2 rows, tensor-parallel rows or
    columns) from the memory-mapped files, cast to the parameter's dtype as it is copied in.
    """
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    params = {name: p for part in parts for name, p in part.named_parameters()
              if added is None or not added(name)}
    with HFWeights(path) as weights:
        sources = hf_sources(spec, weights.names(), config)
        missing = [name for name in params if name not in sources]
        if missing:
            raise CheckpointError(f"{path}: weights missing for {', '.join(missing[:3])}" +
                                  (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        with torch.device("meta"):
            full = spec.build(config)
        known = set(dict(full.named_parameters(remove_duplicate=False)))
        unexpected = [name for name in sources if name not in known]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected weights {', '.join(unexpected[:3])}" +
                                  (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
        for name, param in params.items():
            shape = weights.shape(sources[name])
            if shape != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {shape}, model expects {tuple(param.shape)}")
            copy_local_into(param, read_local(weights, sources[name], param))
        return weights.bytes_read
