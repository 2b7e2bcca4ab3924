"""Reference weights load into sharded models with each rank reading only its slices.

Tiny sharded checkpoints (several safetensors files and an index, as transformers / diffusers write
them) of both families: Qwen2.5-VL in bf16 with tied embeddings (cast to the fp32 parameters as they
arrive; the head read from the embedding), Wan in fp32 with widths that four ranks split unevenly.

* One process: ``load_weights_into`` gives exactly what ``from_pretrained`` (the whole-checkpoint
  load) gives, LoRA adapters are skipped, and bad checkpoints are one-line ``CheckpointError``s.
* Four gloo ranks (one spawn), layouts built as the training model builder builds them: dp_shard=2 x
  dp_replicate=2, dp_shard=2 x tp=2 and dp_shard=4 (with LoRA adapters) for Qwen2.5-VL, pp=2 x
  dp_shard=2 (the last stage's tied head), and dp_shard=2 x tp=2 and dp_shard=4 for Wan. Every
  parameter's full value equals the one-process load exactly, and the safetensors files are watched
  (``safe_open`` wrapped): for every tensor a rank reads exactly as many elements as its shards hold,
  never a whole sharded tensor, and ``load_weights_into`` reports those bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from _spawn import run_workers

from openspeed.errors import CheckpointError

WORLD = 4
# Wan widths: ffn 66 splits 17/17/17/15 over dp_shard=4 and 33 -> 17/16 under tp=2 x dp_shard=2.
WAN = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=18,
           freq_dim=16, ffn_dim=66, num_layers=2, rope_max_seq_len=16)
LAYOUTS = {
    "qwen": [{"dp_shard": 2, "dp_replicate": 2}, {"dp_shard": 2, "tp": 2}, {"dp_shard": 4, "lora": True},
             {"pp": 2, "dp_shard": 2}],
    "wan": [{"dp_shard": 2, "tp": 2}, {"dp_shard": 4}],
}


def _spec_and_config(family: str):
    from openspeed.models.registry import get_model_spec

    if family == "qwen":
        from _qwen_tiny import native_config

        return get_model_spec("qwen2_5_vl"), native_config(tie_word_embeddings=True)
    from openspeed.models.wan import WanConfig

    return get_model_spec("WanTransformer3DModel"), WanConfig(**WAN)


def _write_checkpoint(family: str, out: Path) -> Path:
    """A random model of ``family`` as a sharded reference checkpoint (about 6 files) in ``out``."""
    from safetensors.torch import save_file

    spec, config = _spec_and_config(family)
    dtype = torch.bfloat16 if family == "qwen" else torch.float32
    with torch.device("meta"):
        model = spec.build(config)
    gen = torch.Generator().manual_seed(7)
    native = {name: torch.randn(p.shape, generator=gen).to(dtype) for name, p in model.named_parameters()}
    hf = spec.native_to_hf(native, config)
    weights, index = (("model", "model.safetensors.index.json") if family == "qwen"
                      else ("diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json"))
    budget = sum(t.numel() * t.element_size() for t in hf.values()) // 6
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in hf.items():
        if shards[-1] and sum(t.numel() * t.element_size() for t in shards[-1].values()) > budget:
            shards.append({})
        shards[-1][name] = tensor.contiguous()
    out.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"{weights}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(config)))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded_ckpts")
    return {family: _write_checkpoint(family, root / family) for family in LAYOUTS}


def _reference(path: Path) -> dict[str, torch.Tensor]:
    import openspeed

    return dict(openspeed.from_pretrained(path).named_parameters(remove_duplicate=False))


def _build(spec, config, sizes: dict[str, int]):
    """As the training model builder does it: meta -> (LoRA) -> pipeline cut -> plan -> to_empty -> buffers."""
    from openspeed.config import LoRAConfig, ParallelConfig, RunConfig
    from openspeed.distributed.mesh import build_mesh
    from openspeed.lora import add_adapters

    sizes = dict(sizes)
    lora = sizes.pop("lora", False)
    full = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1, **sizes}
    dims = build_mesh(full, "cpu")
    cfg = RunConfig()  # the defaults, but for the layout
    cfg.parallel = ParallelConfig(**full)
    with torch.device("meta"):
        model = spec.build(config)
    if lora:
        add_adapters(model, spec, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    parts = spec.pipeline.stage_modules(model, dims, cfg.parallel) if full["pp"] > 1 else [model]
    for part in parts:
        spec.parallelize(part, dims, cfg)
        part.to_empty(device="cpu")
        spec.reset_buffers(part, torch.device("cpu"))
    return parts, lora


class _Watched:
    """A ``safe_open`` file (or one of its slices) that counts the elements read of each tensor."""

    def __init__(self, inner, counts: dict[str, int], name: str | None = None) -> None:
        self.inner, self.counts, self.name = inner, counts, name

    def __enter__(self):
        return _Watched(self.inner.__enter__(), self.counts)

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def _count(self, name: str, value: torch.Tensor) -> torch.Tensor:
        self.counts[name] = self.counts.get(name, 0) + value.numel()
        return value

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._count(name, self.inner.get_tensor(name))

    def get_slice(self, name: str):
        return _Watched(self.inner.get_slice(name), self.counts, name)

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        return self._count(self.name, self.inner[index])


def _check_layout(family: str, path: Path, sizes: dict, reference: dict[str, torch.Tensor]) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openspeed.lora import is_lora_param
    from openspeed.models import loading
    from openspeed.models.loading import hf_sources
    from openspeed.training.model_setup import load_weights_into

    spec, config = _spec_and_config(family)
    parts, lora = _build(spec, config, sizes)
    counts: dict[str, int] = {}
    real_open = loading.safe_open
    loading.safe_open = lambda *args, **kwargs: _Watched(real_open(*args, **kwargs), counts)
    try:
        bytes_read = load_weights_into(parts, spec, config, str(path), added=is_lora_param if lora else None)
    finally:
        loading.safe_open = real_open

    with loading.HFWeights(path) as weights:
        sources = hf_sources(spec, weights.names(), config)
        itemsize = weights.read(weights.names()[0]).element_size()
        checkpoint_bytes = sum(math.prod(weights.shape(n)) for n in weights.names()) * itemsize
    expected: dict[str, int] = {}
    mismatched, sharded, adapters = [], 0, 0
    for part in parts:
        for name, param in part.named_parameters():
            if is_lora_param(name):
                adapters += 1
                continue
            local = param.to_local() if isinstance(param, DTensor) else param
            sharded += int(local.numel() < param.numel())
            expected[sources[name]] = expected.get(sources[name], 0) + local.numel()
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if not torch.equal(full.detach(), reference[name]):
                mismatched.append(name)
    dist.barrier()
    return {"mismatched": mismatched, "over_read": sorted(n for n in counts if counts[n] != expected.get(n)),
            "unread": sorted(set(expected) - set(counts)), "bytes_read": bytes_read,
            "counted_bytes": sum(counts.values()) * itemsize, "sharded": sharded, "adapters": adapters,
            "checkpoint_bytes": checkpoint_bytes}


def _worker(rank: int, out_dir: str) -> None:
    paths = json.loads(Path(out_dir, "paths.json").read_text())
    results = {}
    for family, layouts in LAYOUTS.items():
        reference = _reference(Path(paths[family]))
        for sizes in layouts:
            key = f"{family} " + " x ".join(f"{k}={v}" for k, v in sizes.items())
            results[key] = _check_layout(family, Path(paths[family]), sizes, reference)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def sharded_results(checkpoints, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded_results")
    (out / "paths.json").write_text(json.dumps({k: str(v) for k, v in checkpoints.items()}))
    run_workers(_worker, WORLD, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_one_process_load_equals_from_pretrained(checkpoints, family):
    from openspeed.models.loading import HFWeights
    from openspeed.training.model_setup import load_weights_into

    spec, config = _spec_and_config(family)
    assert len(list(checkpoints[family].glob("*.safetensors"))) >= 4  # really sharded
    model = spec.build(config)
    bytes_read = load_weights_into(model, spec, config, str(checkpoints[family]))
    reference = _reference(checkpoints[family])
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(param.detach(), reference[name]), name
    with HFWeights(checkpoints[family]) as weights:  # every tensor read once, whole
        assert bytes_read == sum(weights.read(n).numel() * weights.read(n).element_size() for n in weights.names())
    if family == "qwen":  # tied: the head is the embedding, read once
        assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_lora_adapters_are_left_to_their_own_initialisation(checkpoints):
    from openspeed.config import LoRAConfig
    from openspeed.lora import add_adapters, is_lora_param
    from openspeed.training.model_setup import load_weights_into

    spec, config = _spec_and_config("qwen")
    model = spec.build(config)
    add_adapters(model, spec, LoRAConfig(rank=2, targets=["q_proj"]))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_param(n)}
    assert adapters
    with pytest.raises(CheckpointError, match=r"weights missing for .*lora_A"):
        load_weights_into(model, spec, config, str(checkpoints["qwen"]))
    load_weights_into(model, spec, config, str(checkpoints["qwen"]), added=is_lora_param)
    reference = _reference(checkpoints["qwen"])
    for name, param in model.named_parameters():
        expected = adapters[name] if is_lora_param(name) else reference[name]
        assert torch.equal(param.detach(), expected), name


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _one_line_error(path: Path, family: str = "wan") -> str:
    from openspeed.training.model_setup import load_weights_into

    spec, config = _spec_and_config(family)
    with torch.device("meta"):
        model = spec.build(config)
    model.to_empty(device="cpu")
    with pytest.raises(CheckpointError) as info:
        load_weights_into(model, spec, config, str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_checkpoints_are_one_line_errors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints["wan"]
    index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]

    def shard_of(name: str, root: Path) -> Path:
        return root / index[name]

    # A weight the model has no place for, one it misses, and one of the wrong shape.
    extra = _copy(src, tmp_path / "extra")
    file = shard_of("proj_out.weight", extra)
    tensors = load_file(str(file))
    save_file({**tensors, "blocks.0.extra.weight": torch.zeros(2)}, str(file))
    assert "unexpected weights blocks.0.extra.weight" in _one_line_error(extra)

    missing = _copy(src, tmp_path / "missing")
    file = shard_of("blocks.1.attn2.to_k.weight", missing)
    tensors = load_file(str(file))
    del tensors["blocks.1.attn2.to_k.weight"]
    save_file(tensors, str(file))
    (missing / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: v for k, v in index.items() if k != "blocks.1.attn2.to_k.weight"}}))
    assert "weights missing for blocks.1.cross_attn.k_proj.weight" in _one_line_error(missing)

    shape = _copy(src, tmp_path / "shape")
    file = shard_of("blocks.0.ffn.net.0.proj.weight", shape)
    tensors = load_file(str(file))
    tensors["blocks.0.ffn.net.0.proj.weight"] = tensors["blocks.0.ffn.net.0.proj.weight"][:-1].contiguous()
    save_file(tensors, str(file))
    message = _one_line_error(shape)
    assert "blocks.0.ffn.fc1.weight has shape (65, 24), model expects (66, 24)" in message

    # An index naming a tensor no shard holds, a shard that is gone, a shard that is not safetensors.
    listed = _copy(src, tmp_path / "listed")
    (listed / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**index, "blocks.9.attn1.to_q.weight": index["proj_out.weight"]}}))
    assert "lists tensors missing from its shards: blocks.9.attn1.to_q.weight" in _one_line_error(listed)

    gone = _copy(src, tmp_path / "gone")
    os.remove(shard_of("proj_out.weight", gone))
    assert f"weight file not found: {shard_of('proj_out.weight', gone)}" in _one_line_error(gone)

    corrupt = _copy(src, tmp_path / "corrupt")
    shard_of("proj_out.weight", corrupt).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    assert f"cannot read {shard_of('proj_out.weight', corrupt)}" in _one_line_error(corrupt)


# ------------------------------------------------------------------------------- four gloo processes


@pytest.mark.parametrize("layout", [f"{family} " + " x ".join(f"{k}={v}" for k, v in sizes.items())
                                    for family, layouts in LAYOUTS.items() for sizes in layouts])
def test_sharded_load_equals_one_process_and_reads_only_local_slices(sharded_results, layout):
    for rank, results in enumerate(sharded_results):
        got = results[layout]
        assert got["mismatched"] == [], f"rank {rank}: differs from the one-process load"
        # Exactly this rank's shard of every tensor was read, nothing more, nothing twice.
        assert got["over_read"] == [] and got["unread"] == [], f"rank {rank}: {got}"
        assert got["bytes_read"] == got["counted_bytes"]
        assert got["sharded"] > 0 and got["bytes_read"] < got["checkpoint_bytes"]
        if "lora" in layout:
            assert got["adapters"] > 0
