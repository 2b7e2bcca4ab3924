"""Load Hugging Face-format model directories (config.json + safetensors) into native models.

diffusers directories (a ``config.json`` naming its ``_class_name`` instead of a ``model_type``, and
``diffusion_pytorch_model.safetensors`` weights) load the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from openspeed.errors import CheckpointError, ConfigError
from openspeed.models.registry import get_model_spec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# (sharded index, single file) pairs, tried in this order.
_WEIGHT_FILES = ((WEIGHTS_INDEX_NAME, WEIGHTS_NAME), (DIFFUSERS_WEIGHTS_INDEX_NAME, DIFFUSERS_WEIGHTS_NAME))


def _model_dir(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    return directory


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of the model directory ``path``."""
    config_path = _model_dir(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in model directory {config_path.parent}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    return config


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"weight file not found: {file}")
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the model directory ``path`` (single or sharded safetensors), on the CPU.

    Reads transformers names (``model.safetensors``) or diffusers names
    (``diffusion_pytorch_model.safetensors``), each single or with a ``.index.json``.
    """
    directory = _model_dir(path)
    for index_name, single_name in _WEIGHT_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            return _load_sharded(directory, index_path)
        single = directory / single_name
        if single.is_file():
            return _load_safetensors(single)
    raise CheckpointError(
        f"no {WEIGHTS_NAME} or {DIFFUSERS_WEIGHTS_NAME} (or their .index.json) in model directory {directory}"
    )


def _load_sharded(directory: Path, index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {index_path}: {exc!r}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_safetensors(directory / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path} lists tensors missing from its shards: {_preview(missing)}")
    return state


def has_hf_weights(path: str | Path) -> bool:
    """Whether the model directory ``path`` holds safetensors weights (single file or sharded index)."""
    directory = Path(path)
    return any((directory / name).is_file() for names in _WEIGHT_FILES for name in names)


def hf_model_type(hf_config: dict[str, Any], path: str | Path) -> str:
    """The registry key of a ``config.json``: its ``model_type``, or diffusers' ``_class_name``."""
    model_type = hf_config.get("model_type")
    if isinstance(model_type, str):
        return model_type
    class_name = hf_config.get("_class_name")
    if model_type is None and isinstance(class_name, str):
        return class_name
    raise ConfigError(f"{Path(path) / CONFIG_NAME} has no model_type")


def config_from_hf(spec, hf_config: dict[str, Any], path: str | Path):
    """``spec.config_from_hf(hf_config)``; a bad value is a ``ConfigError`` naming the ``config.json``."""
    try:
        return spec.config_from_hf(hf_config)
    except ConfigError as exc:
        raise ConfigError(f"{Path(path) / CONFIG_NAME}: {exc}") from None


def model_dir(path: str) -> str:
    """The folder holding the model's ``config.json``: ``path``, or a diffusers pipeline's ``transformer/``."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(
        os.path.join(path, "model_index.json")
    ):
        return os.path.join(path, "transformer")
    return path


def model_config_from_run(cfg):
    """``(spec, native config)`` of a run config's ``model.path``, with run-level overrides applied."""
    from openspeed.models.registry import get_model_spec

    path = model_dir(cfg.model.path)
    hf_config = read_hf_config(path)
    spec = get_model_spec(hf_model_type(hf_config, path))
    config = config_from_hf(spec, hf_config, path)
    if cfg.model.rope_theta is not None:
        spec.set_rope_theta(config, cfg.model.rope_theta)
    return spec, config


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Build the native model for the Hugging Face model directory ``path`` and load its weights.

    The model is built on the ``meta`` device and takes the checkpoint tensors directly (cast to
    ``dtype``, moved to ``device``), so weights are never allocated twice. Loading is strict: missing
    or unexpected keys raise :class:`CheckpointError`. Returns the model in eval mode.
    """
    hf_config = read_hf_config(path)
    spec = get_model_spec(hf_model_type(hf_config, path))
    config = config_from_hf(spec, hf_config, path)
    state = spec.hf_to_native(load_hf_state_dict(path), config)

    with torch.device("meta"):
        model = spec.build(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        raise CheckpointError(f"checkpoint {path} does not match {spec.name}: " + "; ".join(parts))

    device = torch.device(device)
    state = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[:3])
        raise CheckpointError(f"checkpoint {path} does not fit {spec.name}: {detail}") from None
    spec.reset_buffers(model, device)
    return model.eval()
