"""Export a trained run as a Hugging Face-format model directory, or a LoRA run's adapter for peft.

:func:`export_hf`: the result loads with ``transformers``' ``from_pretrained`` (and with
:func:`openspeed.from_pretrained`): ``config.json`` describes the *trained* model (run-level overrides
such as ``model.rope_theta`` included), the weights are safetensors in Hugging Face names, sharded
with an index when large, and the tokenizer / processor / generation files are copied from the run's
model directory. A LoRA run's adapters are merged into the weights (a plain model).

:func:`export_peft`: a LoRA run's adapters alone, as ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads over the HF model the run
started from (``model.path``).

Both load the run on ``device`` (default the CPU, where the weights are written from anyway) and
write CPU tensors: the files are the same bytes whatever the device (a LoRA merge, the one
computation, is done on the CPU).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from openspeed.errors import CheckpointError
from openspeed.models.loading import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    has_hf_weights,
    read_hf_config,
)
from openspeed.training.run_loading import TrainedModel, load_trained

DEFAULT_MAX_SHARD_SIZE = 2_000_000_000

# Non-weight files of a model directory that belong in the export, besides ``chat_template*``.
_ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def _asset_paths(model_dir: Path) -> list[Path]:
    names = set(_ASSET_FILES)
    names.update(os.path.basename(p) for p in glob.glob(str(model_dir / "chat_template*")))
    return sorted(model_dir / n for n in names if (model_dir / n).is_file())


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` (in key order) into groups of at most ``max_bytes`` each.

    A tensor larger than the limit gets a shard of its own (tensors are never split), as
    ``save_pretrained`` does.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU tensors, none sharing memory with another.

    safetensors refuses tensors that share storage; ``native_to_hf`` already drops the tied
    ``lm_head``, so copies are only made for whatever else might share (never, for a plain model).
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        tensor = value.to("cpu", torch.float32 if value.is_floating_point() else value.dtype).contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = tensor
    return out


def _remove_old_weights(out: Path) -> None:
    # Shards of an earlier export with another shard count would otherwise sit beside the new ones,
    # and a stale single file could shadow a new index.
    for path in [out / WEIGHTS_NAME, out / WEIGHTS_INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        if path.is_file():
            path.unlink()


def _load_merged(run_dir_or_checkpoint: str, merge_lora: bool, ema: bool = False,
                 device: torch.device | str = "cpu") -> TrainedModel:
    """The run's model as a plain one: a LoRA run's adapters folded into their base weights; with
    ``ema`` the checkpoint's EMA weights instead of the trained ones. Loaded on ``device``; a model
    with adapters is moved to the CPU to merge them, so the merged weights do not depend on the
    device's matmul rounding."""
    from openspeed.lora import lora_modules
    from openspeed.lora import merge_lora as merge
    from openspeed.training.ema import ema_keys, load_ema_weights

    trained = load_trained(run_dir_or_checkpoint, device=device)  # a LoRA run: base + adapters
    if ema:
        if trained.checkpoint is None or not ema_keys(trained.checkpoint):
            raise CheckpointError(f"--ema: run {trained.run_dir} has no checkpoint with EMA weights "
                                  "(train.ema_decay was not set)")
        load_ema_weights(trained.model, trained.checkpoint)
    if lora_modules(trained.model):
        merge(trained.model.cpu())
    elif merge_lora:
        raise CheckpointError(
            f"run {run_dir_or_checkpoint} has no LoRA adapters to merge (model.lora.rank is 0)"
        )
    return trained


def _check_target(out: Path, model_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} exists and is not a directory")
    if out.is_dir() and model_dir.is_dir() and out.resolve() == model_dir.resolve():
        # Overwriting the source would replace its config (the run's overrides baked in) and weights.
        raise CheckpointError(f"export target {out} is the run's model directory; choose another")


def export_hf(
    run_dir_or_checkpoint: str,
    out_dir: str | os.PathLike,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE,
    merge_lora: bool = False,
    ema: bool = False,
    device: torch.device | str = "cpu",
) -> Path:
    """Write the run's latest (or the given) checkpoint to ``out_dir`` in Hugging Face format.

    A LoRA run is written with its adapters merged into the base weights; ``merge_lora=True`` (the
    CLI's ``--merge-lora``) asks for exactly that and makes a run without adapters an error.
    Writes ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size_bytes``), and copies
    the tokenizer files, ``preprocessor_config.json``, ``chat_template*`` and
    ``generation_config.json`` from the run's model directory. Weights are saved in fp32, as trained,
    from the CPU: loading the run on another ``device`` writes the same bytes.
    Returns ``out_dir``. Raises :class:`CheckpointError` for an unusable run or target.
    """
    if max_shard_size_bytes < 1:
        raise ValueError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    trained = _load_merged(run_dir_or_checkpoint, merge_lora, ema, device)
    model_dir = Path(trained.run_config.model.path)
    out = Path(out_dir)
    _check_target(out, model_dir)
    out.mkdir(parents=True, exist_ok=True)

    hf_config = trained.spec.config_to_hf(trained.config)
    hf_config["dtype"] = "float32"  # what the weights below are; transformers reads it as the default
    (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")

    native = {k: v.detach() for k, v in trained.model.state_dict().items()}
    tensors = _own_storage(trained.spec.native_to_hf(native, trained.config))
    _remove_old_weights(out)
    metadata = {"format": "pt"}  # transformers checks this marker when loading safetensors
    shards = _shard(tensors, max_shard_size_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    for path in _asset_paths(model_dir):
        shutil.copyfile(path, out / path.name)
    return out


def export_peft(run_dir_or_checkpoint: str, out_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Path:
    """Write a LoRA run's adapters (latest or given checkpoint) to ``out_dir`` in peft's format.

    ``adapter_config.json`` names the base model (``base_model_name_or_path``: the run's
    ``model.path``), the adapted modules in Hugging Face names, ``r``, ``lora_alpha`` and
    ``lora_dropout``; ``adapter_model.safetensors`` holds ``base_model.model.<HF module>.lora_A.weight``
    / ``lora_B.weight`` in fp32. The adapter only reproduces the trained model over that base, so a run
    whose base is not ``model.path``'s weights as they are (no weights there: drawn from the seed; or a
    run-level override such as ``model.rope_theta``) is a :class:`CheckpointError` pointing to the
    merged export. The run is loaded on ``device``; the adapters are written from the CPU. Returns
    ``out_dir``.
    """
    from openspeed.errors import ConfigError
    from openspeed.lora import lora_state_dict, save_peft_adapter
    from openspeed.models.loading import model_config_from_run
    from openspeed.models.loading import model_dir as resolve_model_dir
    from openspeed.training.run_loading import load_lora_run, run_config_of

    # Checked before the model is built: the base must be model.path's weights as they are.
    cfg = run_config_of(run_dir_or_checkpoint)
    if cfg.model.lora.rank < 1:
        raise CheckpointError(
            f"--to peft: run {run_dir_or_checkpoint} has no LoRA adapters (model.lora.rank is 0)"
        )
    base = resolve_model_dir(cfg.model.path)
    try:
        spec, config = model_config_from_run(cfg)
    except ConfigError as e:
        raise CheckpointError(f"run {run_dir_or_checkpoint}: model {cfg.model.path}: {e}") from None
    if not has_hf_weights(base):
        raise CheckpointError(
            f"--to peft: the run's base model {cfg.model.path} has no weights (they were drawn from "
            "train.seed), so no peft base model matches the adapter; export the merged model with --to hf"
        )
    if spec.config_from_hf(read_hf_config(base)) != config:
        raise CheckpointError(
            f"--to peft: the run changed the base model's config (e.g. model.rope_theta), so "
            f"{cfg.model.path} plus the adapter is not the trained model; export the merged model "
            "with --to hf"
        )
    out = Path(out_dir)
    _check_target(out, Path(base))
    trained = load_lora_run(run_dir_or_checkpoint, device=device)
    lora = cfg.model.lora
    save_peft_adapter(
        out, lora_state_dict(trained.model), lora.rank, lora.alpha if lora.alpha is not None else lora.rank,
        spec.module_name_to_ref, base_model_name_or_path=os.path.abspath(cfg.model.path), dropout=lora.dropout,
    )
    return out


def export_run(run_dir_or_checkpoint: str, out_dir: str | os.PathLike, *, to: str | None = None,
               merge_lora: bool = False, ema: bool | None = None,
               max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE, device: torch.device | str = "cpu") -> str:
    """``openspeed convert``: the run's family's export (``spec.export``), or, for families without
    one, the transformers-format model (``to="hf"``, LoRA merged) or the peft adapter (``to="peft"``).
    The run is loaded on ``device`` (the files are the same whatever it is). Returns the line to print."""
    import inspect

    from openspeed.errors import ConfigError, OpenSpeedError
    from openspeed.models.loading import model_config_from_run
    from openspeed.training.run_loading import run_config_of

    device = torch.device(device)
    spec, _ = model_config_from_run(run_config_of(run_dir_or_checkpoint))
    if spec.export is not None:
        options = {}
        if device.type != "cpu":
            # A family's export takes ``device`` when it can load the run elsewhere than the CPU.
            if "device" not in inspect.signature(spec.export).parameters:
                raise ConfigError(f"--device {device}: the {spec.name} export loads runs on the CPU only "
                                  "(use --device cpu)")
            options["device"] = device
        return spec.export(run_dir_or_checkpoint, out_dir, to=to, merge_lora=merge_lora, ema=ema,
                           max_shard_size_bytes=max_shard_size_bytes, **options)
    if to == "peft":
        if merge_lora:
            raise OpenSpeedError("--merge-lora writes the merged model (--to hf), not a peft adapter")
        if ema:
            raise OpenSpeedError("--ema: a peft adapter holds the trained adapters; export the EMA with --to hf")
        return f"wrote a LoRA adapter (peft format) to {export_peft(run_dir_or_checkpoint, out_dir, device)}"
    if to is None and not merge_lora:
        raise OpenSpeedError("openspeed convert: the following arguments are required: --to")
    out = export_hf(run_dir_or_checkpoint, out_dir, max_shard_size_bytes=max_shard_size_bytes,
                    merge_lora=merge_lora, ema=bool(ema), device=device)
    return f"wrote a Hugging Face-format model to {out}"
