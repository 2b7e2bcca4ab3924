"""Load a trained run's model into one plain (unsharded) process, for evaluation and export.

A run directory holds ``config.yaml`` (the resolved run config) and DCP checkpoints under
``checkpoints/step_<N>/`` written by any number of ranks. DCP reshards on load, so a single process
without a process group can read any of them into a full model (``dcp.load(..., no_dist=True)``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from openspeed.config import RunConfig, load_config
from openspeed.errors import CheckpointError, ConfigError, OpenSpeedError
from openspeed.lora import adapter_view, add_adapters, init_lora, is_lora_param
from openspeed.models.loading import has_hf_weights, model_dir
from openspeed.models.registry import ModelSpec
from openspeed.training.checkpoint import STEP_DIR, TRAIN_STATE, checkpoint_root, latest_checkpoint
from openspeed.training.model_setup import load_base_weights, load_weights_into, model_config_from_run

RUN_CONFIG = "config.yaml"
# Top-level key of the model state in the checkpoints ``save_checkpoint`` writes.
MODEL_KEY = "model"


@dataclass
class TrainedModel:
    """A run's model with what was needed to build it.

    ``checkpoint`` is ``None`` when the weights came from the model directory (no checkpoint yet);
    ``step`` is then 0.
    """

    model: nn.Module
    spec: ModelSpec
    config: Any
    run_config: RunConfig
    run_dir: str
    checkpoint: str | None
    step: int


def _resolve(path: str) -> tuple[str, str | None]:
    """(run_dir, checkpoint dir or None) for a run directory or one of its checkpoint directories."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"run or checkpoint directory not found: {path}")
    name = os.path.basename(path)
    if name.endswith(".incomplete"):
        raise CheckpointError(f"checkpoint {path} is incomplete (its save never finished)")
    if os.path.isfile(os.path.join(path, TRAIN_STATE)) or STEP_DIR.match(name):
        if not os.path.isfile(os.path.join(path, TRAIN_STATE)):
            raise CheckpointError(f"checkpoint {path} is incomplete or not a checkpoint (no {TRAIN_STATE})")
        # <run_dir>/checkpoints/step_<N>
        return os.path.dirname(os.path.dirname(path)), path
    if not os.path.isfile(os.path.join(path, RUN_CONFIG)):
        raise CheckpointError(f"{path} is neither a run directory (no {RUN_CONFIG}) nor a checkpoint")
    return path, latest_checkpoint(path)


def _read_run_config(run_dir: str) -> RunConfig:
    config_path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"no {RUN_CONFIG} in run directory {run_dir}")
    try:
        return load_config(config_path, run_config=True)
    except OpenSpeedError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def _read_step(checkpoint: str) -> int:
    state_file = os.path.join(checkpoint, TRAIN_STATE)
    try:
        with open(state_file, encoding="utf-8") as fh:
            return int(json.load(fh)["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the step from {state_file}: {e!r}") from None


def load_dcp_model_state(model: nn.Module, checkpoint: str, tied_lm_head: bool = False) -> None:
    """Load the ``model`` part of a DCP checkpoint into the plain module ``model`` in place.

    Works without a process group. Every entry of ``model.state_dict()`` must be in the checkpoint
    with the same shape (``lm_head.weight`` may be absent when ``tied_lm_head``: it shares the
    embedding); the optimizer state and anything else in the checkpoint is not read.
    """
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    except Exception as e:  # any unreadable/absent .metadata: report it as a bad checkpoint
        raise CheckpointError(f"cannot read the DCP metadata of checkpoint {checkpoint}: {e!r}") from None
    stored = metadata.state_dict_metadata
    wanted: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for name, tensor in model.state_dict().items():
        key = f"{MODEL_KEY}.{name}"
        entry = stored.get(key)
        if entry is None:
            if not (tied_lm_head and name == "lm_head.weight"):
                missing.append(name)
            continue
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(tensor.shape):
            shape = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "non-tensor"
            mismatched.append(f"{name} {shape} vs model {tuple(tensor.shape)}")
            continue
        wanted[key] = tensor
    if missing or mismatched:
        parts = []
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            parts.append(f"missing {', '.join(missing[:3])}{more}")
        if mismatched:
            parts.append(f"shape mismatch {', '.join(mismatched[:3])}")
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model: " + "; ".join(parts))
    try:
        # Flat "model.<name>" keys address the same entries as the nested {"model": {...}} that was
        # saved (DCP flattens nested dicts with dots). The tensors are filled in place.
        with warnings.catch_warnings():
            # DCP warns that it assumes a single process: here that is exactly the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, checkpoint_id=checkpoint, no_dist=True)
    except Exception as e:  # DCP wraps per-item read errors in its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {first}") from None


def load_trained(run_dir_or_checkpoint: str, device: torch.device | str = "cpu") -> TrainedModel:
    """Build the run's model (with its config overrides) and load its latest complete weights.

    ``run_dir_or_checkpoint`` is a run directory (its latest complete checkpoint is used) or a
    ``checkpoints/step_<N>`` directory inside one. Without any checkpoint the model directory's HF
    weights are loaded, if it has some. A LoRA run (``model.lora.rank`` > 0) gets its base weights and
    its adapters (:func:`load_lora_run`). The model is fp32, unsharded, in eval mode, on ``device``
    (a concrete one, e.g. from :func:`openspeed.accelerator.resolve_device`): it is materialised
    there and the stored tensors are copied into it as they are read, with no full CPU copy first.
    Raises :class:`CheckpointError` naming the offending path.
    """
    run_dir, checkpoint = _resolve(run_dir_or_checkpoint)
    run_cfg = _read_run_config(run_dir)
    if run_cfg.model.lora.rank > 0:  # adapter-only checkpoints: base weights + adapters, unmerged
        return load_lora_run(run_dir_or_checkpoint, device)
    try:
        spec, config = model_config_from_run(run_cfg)
    except ConfigError as e:  # CheckpointErrors from the model directory already name their path
        raise CheckpointError(f"{os.path.join(run_dir, RUN_CONFIG)}: model {run_cfg.model.path}: {e}") from None
    device = torch.device(device)
    with torch.device("meta"):
        model = spec.build(config)
    model.to_empty(device=device)
    spec.reset_buffers(model, device)

    if checkpoint is not None:
        tied = bool(getattr(config, "tie_word_embeddings", False))
        load_dcp_model_state(model, checkpoint, tied_lm_head=tied)
        step = _read_step(checkpoint)
    elif has_hf_weights(model_dir(run_cfg.model.path)):
        load_weights_into(model, spec, config, model_dir(run_cfg.model.path))
        step = 0
    else:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint under {checkpoint_root(run_dir)} and its model "
            f"directory {run_cfg.model.path} has no weights"
        )
    # Loading in place keeps a tie intact, but re-tie anyway: cheap, and safe if it ever broke.
    spec.reset_buffers(model, device)
    return TrainedModel(model.eval(), spec, config, run_cfg, run_dir, checkpoint, step)


def run_config_of(run_dir_or_checkpoint: str) -> RunConfig:
    """The resolved config of a run (its directory or one of its checkpoints); ``CheckpointError`` if none."""
    run_dir, _ = _resolve(run_dir_or_checkpoint)
    return _read_run_config(run_dir)


def load_lora_run(run_dir_or_checkpoint: str, device: torch.device | str = "cpu") -> TrainedModel:
    """A LoRA run's model in one plain process: base weights as trained from, adapters from the checkpoint.

    The model keeps its :class:`~openspeed.lora.LoRALinear` layers (eval mode, fp32, unsharded, on
    ``device``, as in :func:`load_trained`). Without a checkpoint the adapters are the initial ones (the base model). Raises
    :class:`CheckpointError` naming the path.
    """
    run_dir, checkpoint = _resolve(run_dir_or_checkpoint)
    cfg = _read_run_config(run_dir)
    if cfg.model.lora.rank < 1:
        raise CheckpointError(f"run {run_dir} has no LoRA adapters (model.lora.rank is 0)")
    try:
        spec, config = model_config_from_run(cfg)
        with torch.device("meta"):
            model = spec.build(config)
        add_adapters(model, spec, cfg.model.lora)
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


def load_trained_model(
    run_dir_or_checkpoint: str, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Any, RunConfig, int]:
    """``(model, processor, run_config, step)`` of a trained run; see :func:`load_trained`.

    ``processor`` is the :class:`~openspeed.data.processor.VLProcessor` of the run's model directory;
    ``step`` is the checkpoint's step (0 when the weights came from the model directory).
    """
    from openspeed.data.processor import VLProcessor

    trained = load_trained(run_dir_or_checkpoint, device)
    processor = VLProcessor.from_pretrained(trained.run_config.model.path)
    return trained.model, processor, trained.run_config, trained.step
