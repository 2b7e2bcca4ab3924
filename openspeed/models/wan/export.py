"""Export a trained Wan run: a diffusers transformer folder (LoRA merged if asked) or a peft adapter.

``openspeed convert RUN_DIR --merge-lora --out DIR`` folds the adapters into the base weights and writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` (sharded with an index when large) in diffusers'
names: ``WanTransformer3DModel.from_pretrained(DIR)`` and ``openspeed.from_pretrained(DIR)`` load it.
``--to hf`` without ``--merge-lora`` writes the full transformer of a run without LoRA, and the
adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, peft's format over diffusers'
module names) of a LoRA run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from openspeed.errors import CheckpointError
from openspeed.models.loading import CONFIG_NAME, DIFFUSERS_WEIGHTS_INDEX_NAME, DIFFUSERS_WEIGHTS_NAME


def _prepare_out(out_dir: str | os.PathLike, model_path: str) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} exists and is not a directory")
    source = Path(model_path)
    for folder in (source, source / "transformer"):
        if out.is_dir() and folder.is_dir() and out.resolve() == folder.resolve():
            raise CheckpointError(f"export target {out} is the run's model directory; choose another")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_wan(run_dir_or_checkpoint: str, out_dir: str | os.PathLike, *, merge_lora: bool = False,
               ema: bool | None = None, max_shard_size_bytes: int = 2_000_000_000) -> dict:
    """Write the run's DiT to ``out_dir``; returns ``{"out", "kind", "step"}`` (kind: transformer | adapter).

    ``ema``: the EMA weights (``None``: when the checkpoint has them)."""
    from openspeed.lora import lora_state_dict, save_peft_adapter
    from openspeed.lora import merge_lora as merge
    from openspeed.models.wan.convert import native_module_to_diffusers, native_to_hf
    from openspeed.models.wan.generate import load_trained_dit
    from openspeed.training.export import _own_storage, _shard

    trained = load_trained_dit(run_dir_or_checkpoint, "cpu", ema=ema)
    run_cfg = trained.run_config
    out = _prepare_out(out_dir, run_cfg.model.path)
    if merge_lora and not trained.adapted:
        raise CheckpointError(f"run {trained.run_dir} has no LoRA adapters to merge (model.lora.rank is 0)")
    if trained.adapted and not merge_lora:
        lora = run_cfg.model.lora
        alpha = lora.alpha if lora.alpha is not None else lora.rank
        save_peft_adapter(out, lora_state_dict(trained.model), lora.rank, alpha, native_module_to_diffusers,
                          base_model_name_or_path=os.path.abspath(run_cfg.model.path), dropout=lora.dropout)
        return {"out": str(out), "kind": "adapter", "step": trained.step}
    model = merge(trained.model) if trained.adapted else trained.model
    from openspeed.models.wan.config import WanConfig

    config: WanConfig = trained.config
    (out / CONFIG_NAME).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    tensors = _own_storage(native_to_hf({k: v.detach() for k, v in model.state_dict().items()}, config))
    for old in [out / DIFFUSERS_WEIGHTS_NAME, out / DIFFUSERS_WEIGHTS_INDEX_NAME,
                *out.glob("diffusion_pytorch_model-*-of-*.safetensors")]:
        if old.is_file():
            old.unlink()
    shards = _shard(tensors, max_shard_size_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / DIFFUSERS_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / DIFFUSERS_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"out": str(out), "kind": "transformer", "step": trained.step}


__all__ = ["export_wan"]
