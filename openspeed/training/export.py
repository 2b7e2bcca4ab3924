"""Export a trained run as a Hugging Face-format model directory.

The result loads with ``transformers``' ``from_pretrained`` (and with :func:`openspeed.from_pretrained`):
``config.json`` describes the *trained* model (run-level overrides such as ``model.rope_theta``
included), the weights are safetensors in Hugging Face names, sharded with an index when large, and
the tokenizer / processor / generation files are copied from the run's model directory.
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
from openspeed.models.loading import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from openspeed.training.run_loading import load_trained

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


def export_hf(
    run_dir_or_checkpoint: str,
    out_dir: str | os.PathLike,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write the run's latest (or the given) checkpoint to ``out_dir`` in Hugging Face format.

    Writes ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size_bytes``), and copies
    the tokenizer files, ``preprocessor_config.json``, ``chat_template*`` and
    ``generation_config.json`` from the run's model directory. Weights are saved in fp32, as trained.
    Returns ``out_dir``. Raises :class:`CheckpointError` for an unusable run or target.
    """
    if max_shard_size_bytes < 1:
        raise ValueError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    trained = load_trained(run_dir_or_checkpoint, device="cpu")
    model_dir = Path(trained.run_config.model.path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} exists and is not a directory")
    if out.is_dir() and model_dir.is_dir() and out.resolve() == model_dir.resolve():
        # Overwriting the source would replace its config (the run's overrides baked in) and weights.
        raise CheckpointError(f"export target {out} is the run's model directory; choose another")
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
