"""Load Hugging Face-format model directories (config.json + safetensors) into native models.

diffusers directories (a ``config.json`` naming its ``_class_name`` instead of a ``model_type``, and
``diffusion_pytorch_model.safetensors`` weights) load the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

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


def _weight_files(directory: Path) -> tuple[list[Path], tuple[Path, dict] | None]:
    """The safetensors files of a model directory, and its ``(index path, weight map)`` when sharded."""
    for index_name, single_name in _WEIGHT_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read {index_path}: {exc!r}") from None
            return [directory / shard for shard in sorted(set(weight_map.values()))], (index_path, weight_map)
        single = directory / single_name
        if single.is_file():
            return [single], None
    raise CheckpointError(
        f"no {WEIGHTS_NAME} or {DIFFUSERS_WEIGHTS_NAME} (or their .index.json) in model directory {directory}"
    )


class HFWeights:
    """The tensors of a model directory (single or sharded safetensors), read one at a time, whole or sliced.

    The files are opened (memory-mapped), never loaded: a read copies just the asked-for tensor or
    slice into process memory, in the checkpoint's dtype. ``bytes_read`` counts what was copied. Use
    as a context manager; every error is a one-line :class:`CheckpointError` naming the file.
    """

    def __init__(self, path: str | Path) -> None:
        directory = _model_dir(path)
        self.bytes_read = 0
        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[Any, Path]] = {}  # name -> (open file, its path); a later shard wins
        try:
            files, index = _weight_files(directory)
            for file in files:
                handle = self._open(file)
                for name in handle.keys():
                    self._where[name] = (handle, file)
            if index is not None:
                missing = sorted(set(index[1]) - set(self._where))
                if missing:
                    raise CheckpointError(f"{index[0]} lists tensors missing from its shards: {_preview(missing)}")
        except BaseException:
            self._stack.close()
            raise

    def _open(self, file: Path):
        if not file.is_file():
            raise CheckpointError(f"weight file not found: {file}")
        try:
            return self._stack.enter_context(safe_open(str(file), framework="pt"))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        """Every tensor name the directory holds."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name`` (read from the file header)."""
        handle, file = self._where[name]
        try:
            return tuple(handle.get_slice(name).get_shape())
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor ``name``, or its block ``index`` (one slice per dim), as a CPU tensor in the file's dtype."""
        handle, file = self._where[name]
        try:
            value = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None
        self.bytes_read += value.numel() * value.element_size()
        return value


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the model directory ``path`` (single or sharded safetensors), on the CPU.

    Reads transformers names (``model.safetensors``) or diffusers names
    (``diffusion_pytorch_model.safetensors``), each single or with a ``.index.json``. Holds the
    whole checkpoint in memory: to fill a (sharded) model, read only its slices with
    :class:`HFWeights` and :func:`read_local` instead.
    """
    with HFWeights(path) as weights:
        return {name: weights.read(name) for name in weights.names()}


def hf_sources(spec, hf_names: list[str], config) -> dict[str, str]:
    """``{native name: checkpoint tensor name}`` for a checkpoint holding ``hf_names``.

    The family's ``hf_to_native`` renames (and may copy one tensor under two names, as tied
    embeddings do), so applying it to the names themselves says where each native tensor is read from.
    """
    return spec.hf_to_native({name: name for name in hf_names}, config)


# --------------------------------------------------------------------------------------------------
# This rank's slice of a (DTensor) parameter
# --------------------------------------------------------------------------------------------------


def _placement_on_dim(placement, dim: int, ndim: int):
    """``placement`` as it acts on tensor dim ``dim`` alone, for a 1-D tensor along that dim."""
    # _StridedShard first: it is a subclass of Shard in some torch versions.
    if isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor) if placement.dim % ndim == dim else Replicate()
    if isinstance(placement, Shard):
        return Shard(0) if placement.dim % ndim == dim else Replicate()
    if isinstance(placement, Replicate):
        return Replicate()
    raise TypeError(f"cannot load weights into a parameter placed {placement}")


def _as_slice(indices: torch.Tensor) -> slice | torch.Tensor:
    """Sorted-contiguous ``indices`` as a slice; anything else as it is."""
    if indices.numel() == 0:
        return slice(0, 0)
    start = int(indices[0])
    stop = start + indices.numel()
    return slice(start, stop) if torch.equal(indices, torch.arange(start, stop)) else indices


def local_index(param: torch.Tensor) -> tuple[slice | torch.Tensor, ...] | None:
    """Which part of the full tensor this rank's shard of ``param`` holds: per dim, a slice (or, for a
    non-contiguous sharding, the index tensor); ``None`` when it holds all of it (a plain tensor, or a
    replicated DTensor).

    Computed by DTensor's own placement rules on a 1-D ``arange`` per sharded dim, so uneven shards
    and FSDP2's strided sharding of a tensor-parallel dim come out exactly as the parameter holds them.
    """
    if not isinstance(param, DTensor):
        return None
    index: list[slice | torch.Tensor] = []
    for dim, size in enumerate(param.shape):
        placements = [_placement_on_dim(p, dim, param.ndim) for p in param.placements]
        if all(isinstance(p, Replicate) for p in placements):
            index.append(slice(0, size))
            continue
        owned = distribute_tensor(torch.arange(size), param.device_mesh, placements, src_data_rank=None)
        index.append(_as_slice(owned.to_local().cpu()))
    if all(isinstance(i, slice) and (i.start, i.stop) == (0, size) for i, size in zip(index, param.shape)):
        return None
    return tuple(index)


def read_local(weights: HFWeights, name: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name`` for ``param`` (see :func:`local_index`), reading
    only that part (its bounding block, for a non-contiguous sharding); the file's dtype, on the CPU."""
    index = local_index(param)
    if index is None:
        return weights.read(name)
    block = tuple(i if isinstance(i, slice) else slice(int(i.min()), int(i.max()) + 1) for i in index)
    value = weights.read(name, block)
    for dim, i in enumerate(index):
        if not isinstance(i, slice):
            value = value.index_select(dim, i - i.min())
    return value


def copy_local_into(param: torch.Tensor, local: torch.Tensor) -> None:
    """Copy this rank's part ``local`` (from :func:`read_local`) into ``param``, cast to its dtype and device."""
    with torch.no_grad():
        target = param.to_local() if isinstance(param, DTensor) else param
        if tuple(target.shape) != tuple(local.shape):
            raise RuntimeError(f"local shard of shape {tuple(local.shape)} for a shard of {tuple(target.shape)}")
        target.copy_(local)


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
