"""Registry of natively implemented model families, keyed by Hugging Face ``model_type``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from openspeed.errors import ConfigError


@dataclass(frozen=True)
class PipelinePlan:
    """How a model family is cut into pipeline stages (kept beside the model).

    Attributes:
        stage_modules: ``(meta_model, parallel_dims, parallel_config) -> [stage modules]`` for this
            rank, each keeping the full model's parameter names.
        packer: ``(config, seq_len, pad_token_id, micro_batch_size) -> packer`` turning micro-batch
            dicts into first-stage inputs (see :mod:`openspeed.distributed.pipeline`).
        loss: ``(logits, labels, num_items) -> loss`` computed on the last stage.
        check: ``(config, num_stages, pipeline_num_layers)``; raises ``ConfigError`` on a bad split.
    """

    stage_modules: Callable[..., list[nn.Module]]
    packer: Callable[..., Any]
    loss: Callable[..., Any]
    check: Callable[..., Any]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer and loaders need to know about one model family.

    Attributes:
        name: short native name.
        hf_model_types: ``config.json`` ``model_type`` values this spec handles.
        hf_architecture: the Hugging Face class name written into exported configs.
        config_from_hf: ``config.json`` dict -> native config.
        config_to_hf: native config -> ``config.json`` dict.
        build: native config -> ``nn.Module`` (must work under ``torch.device("meta")``).
        hf_to_native: ``(hf_state_dict, config) -> native_state_dict``; renames only (each value
            passed through, one may appear under two names, as a tied head does), so applied to
            ``{name: name}`` it says which checkpoint tensor each native one is read from: loaders
            read each tensor, or a rank's slice of it, on its own (``loading.hf_sources``).
        native_to_hf: ``(native_state_dict, config) -> hf_state_dict``.
        flops: ``(config, num_text_tokens, image_grid_thw, video_grid_thw, ...) -> training FLOPs``.
        reset_buffers: ``(model, device=None)``; refills non-persistent buffers and re-ties shared
            weights after ``to_empty`` or a ``meta``-device ``load_state_dict(assign=True)``.
        init_std: config -> default std of the normal weight initialisation (``initializer_range``).
        set_rope_theta: ``(config, theta)``; overrides the language model's RoPE base in place.
        part_of: parameter name -> the freezable part it belongs to (``vision``, ``merger``, ``llm``).
        parallelize: ``(model, parallel_dims, run_config)``; applies the model's parallel plan to a
            model built on the meta device (kept beside the model, never inside it).
        pipeline: the :class:`PipelinePlan`, or ``None`` when the family has none.
        memory_plan: ``model -> openspeed.memory.MemoryPlan``: the layer stacks and their attention /
            MLP / norm modules that recomputation and activation offload act on (``None``: none).
        task: ``(run_config, device, model_config, spec) -> task``: the family's training task (samples ->
            batches -> loss, counts, FLOPs, evaluation; see :mod:`openspeed.tasks.base`).
        module_name_to_ref: native module name -> the reference library's (``None``: the same). LoRA
            targets may use either spelling, and adapters are written in the reference's.
        check_layout: ``(run_config, sizes)``; one-line ``ConfigError`` for a parallel layout the
            family's plans cannot run (``None``: every layout the generic checks allow).
        trainer: the training loop's class for this family (``None``: :class:`openspeed.training.trainer.Trainer`);
            a subclass overrides only its documented override points.
        export: ``(run_dir_or_checkpoint, out_dir, *, to, merge_lora, ema, max_shard_size_bytes)
            -> message``: ``openspeed convert`` of the family's runs (``None``: the Hugging Face
            transformers-format export of :mod:`openspeed.training.export`).
    """

    name: str
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    build: Callable[[Any], nn.Module]
    hf_to_native: Callable[[dict, Any], dict]
    native_to_hf: Callable[[dict, Any], dict]
    flops: Callable[..., float]
    reset_buffers: Callable[..., None]
    init_std: Callable[[Any], float]
    set_rope_theta: Callable[[Any, float], None]
    part_of: Callable[[str], str]
    parallelize: Callable[..., nn.Module]
    task: Callable[..., Any]
    pipeline: PipelinePlan | None = None
    memory_plan: Callable[[nn.Module], Any] | None = None
    module_name_to_ref: Callable[[str], str] | None = None
    check_layout: Callable[[Any, dict], None] | None = None
    export: Callable[..., str] | None = None
    trainer: type | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_builtins_loaded = False


def register_model(spec: ModelSpec) -> None:
    """Register ``spec`` under each of its ``hf_model_types``; re-registering the same name replaces it."""
    for model_type in spec.hf_model_types:
        existing = _REGISTRY.get(model_type)
        if existing is not None and existing.name != spec.name:
            raise ValueError(f"model type '{model_type}' is already registered by '{existing.name}'")
        _REGISTRY[model_type] = spec


def _load_builtins() -> None:
    """Import every registered family's spec module (found by :mod:`openspeed.models.families`)."""
    global _builtins_loaded
    if not _builtins_loaded:
        from openspeed.models.families import families

        for family in families():
            importlib.import_module(family.spec_module)
        _builtins_loaded = True


def known_model_types() -> list[str]:
    """Sorted ``model_type`` values that have a native implementation."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_model_spec(model_type: str) -> ModelSpec:
    """The spec registered for Hugging Face ``model_type``; :class:`ConfigError` if there is none."""
    _load_builtins()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"model type '{model_type}' is not supported (known: {known})") from None
