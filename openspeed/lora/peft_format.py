"""Adapter-only checkpoints in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are peft's: ``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight`` over the
*reference* model's module names (for the Wan DiT, diffusers' ``WanTransformer3DModel`` names, so
``PeftModel.from_pretrained(diffusers_transformer, DIR)`` loads the adapter). ``target_modules`` lists
the full module names, which peft matches exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _split(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    raise ValueError(f"{name} is not a LoRA parameter name")


def peft_adapter_config(
    target_modules: list[str], rank: int, alpha: float, base_model_name_or_path: str | None = None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a plain LoRA adapter (no bias, standard scaling)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft_adapter(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    module_name: Callable[[str], str] | None = None,
    base_model_name_or_path: str | None = None,
    dropout: float = 0.0,
) -> Path:
    """Write adapter tensors (native parameter names ``<module>.lora_A.weight``) in peft's format.

    ``module_name`` maps a native module name to the reference model's (identity by default);
    ``dropout`` is recorded as ``lora_dropout`` (it only matters if the adapter is trained further).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rename = module_name or (lambda name: name)
    weights: dict[str, torch.Tensor] = {}
    modules = set()
    for name, value in tensors.items():
        module, suffix = _split(name)
        target = rename(module)
        modules.add(target)
        weights[f"{PEFT_PREFIX}{target}{suffix}"] = value.detach().to("cpu", torch.float32).contiguous()
    save_file(weights, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = peft_adapter_config(sorted(modules), rank, alpha, base_model_name_or_path, dropout)
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "PEFT_PREFIX", "peft_adapter_config", "save_peft_adapter"]
