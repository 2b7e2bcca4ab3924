"""Pipeline parallel (torch.distributed.pipelining) for the native Qwen2.5-VL.

One 2-process gloo launch runs every schedule scenario against a single-process reference doing
the same micro-batches with gradient accumulation, from the same seeded weights (``init_weights``
on the full model vs. on each meta-built stage). Micro-batches carry different numbers of image
tokens (one has none, one holds videos, one has a single row), so the packed pixel tensors differ
in size between micro-batches and between the two steps each scenario runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from _qwen_tiny import (
    IMAGE_BATCH,
    IMAGE_ID,
    PAD_ID,
    TEXT_BATCH,
    VIDEO_BATCH,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_batch,
)

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
SEQ_LEN = 40
MBS = 2
SEED, STD = 5, 0.1

# (name, decoder layers, tied embeddings, schedule, virtual stages, pipeline_num_layers, check logits)
SCENARIOS = [
    ("1f1b_3_layers_auto", 3, False, "1f1b", 1, None, True),
    ("interleaved_1f1b_explicit", 5, False, "interleaved_1f1b", 2, [1, 2, 1, 1], True),
    ("1f1b_tied", 2, True, "1f1b", 1, None, False),
    ("dualpipev_tied", 4, True, "dualpipev", 2, None, True),
    ("zero_bubble_v", 3, False, "zero_bubble", 2, None, False),
    ("gpipe", 2, False, "gpipe", 1, None, False),
]



def tiny_config(layers: int, tie: bool) -> Qwen2_5_VLConfig:
    """The tiny model of ``_qwen_tiny.hf_config`` as a native config, with ``layers`` decoder layers."""
    vision = VisionConfig(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        out_hidden_size=64,
        fullatt_block_indexes=(1, 3),
        tokens_per_second=2,
    )
    text = TextConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        mrope_section=(2, 3, 3),
    )
    return Qwen2_5_VLConfig(
        vision=vision,
        text=text,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tie,
    )


def micro_batches() -> list[dict]:
    """Four right-padded micro-batches with 43, 32 (+ videos), 0 and 16 image tokens."""
    single = [[("text", 2), ("image", [1, 8, 8]), ("answer", 4)]]
    specs = [IMAGE_BATCH, VIDEO_BATCH, TEXT_BATCH, single]
    return [make_batch(spec, seed=10 + i) for i, spec in enumerate(specs)]


# --------------------------------------------------------------------------------------------------
# In-process checks (no process group)
# --------------------------------------------------------------------------------------------------


def test_layer_split_and_config_errors():
    from openspeed.distributed.pipeline import check_pipeline_config, local_stage_indices
    from openspeed.models.qwen2_5_vl.pipeline import split_layers

    assert split_layers(3, 2) == [1, 2]
    assert split_layers(28, 8) == [3, 4, 4, 4, 4, 3, 3, 3]
    assert split_layers(2, 4) == [0, 1, 1, 0]
    assert split_layers(5, 4, [1, 2, 1, 1]) == [1, 2, 1, 1]
    assert split_layers(3, 2, [0, 3]) == [0, 3]
    bad = [([1, 1], "sums to 2 layers, the model has 3"), ([1, 1, 1], "3 entries"), ([2, -1], "non-negative")]
    for counts, words in bad:
        with pytest.raises(ConfigError) as info:
            split_layers(3, 2, counts)
        message = str(info.value)
        assert "\n" not in message and message.startswith("parallel.pipeline_num_layers") and words in message
    with pytest.raises(ConfigError, match="middle stage 1"):
        split_layers(3, 3, [2, 0, 1])

    assert local_stage_indices(0, 2, 2, "interleaved_1f1b") == [0, 2]
    assert local_stage_indices(0, 2, 2, "dualpipev") == [0, 3]
    assert local_stage_indices(1, 2, 2, "zero_bubble") == [1, 2]
    for args, words in [
        ((2, 1, "interleaved_1f1b", 4), "virtual_stages >= 2"),
        ((2, 2, "1f1b", 4), "one stage per rank"),
        ((2, 2, "dualpipev", 3), "at least as many micro-batches"),
        ((4, 1, "1f1b", 2), "at least pp=4 micro-batches"),
        ((2, 3, "dualpipev", 8), "virtual_stages=2"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_pipeline_config(*args)
        assert "\n" not in str(info.value) and words in str(info.value)


def test_pad_batch_to_and_packing():
    from openspeed.models.qwen2_5_vl.pipeline import pack_microbatches, pad_batch_to

    batches = micro_batches()
    length = batches[3]["input_ids"].shape[1]
    positions = torch.ones(3, 1, length, dtype=torch.long)
    padded = pad_batch_to({**batches[3], "position_ids": positions}, SEQ_LEN, PAD_ID, MBS)
    assert (
        padded["input_ids"].shape
        == padded["labels"].shape
        == padded["mm_token_type_ids"].shape
        == (MBS, SEQ_LEN)
    )
    assert padded["position_ids"].shape == (3, MBS, SEQ_LEN)
    assert int(padded["attention_mask"].sum()) == int(batches[3]["attention_mask"].sum())
    assert (padded["labels"][1] == -100).all() and (padded["input_ids"][1] == PAD_ID).all()
    assert torch.equal(padded["pixel_values"], batches[3]["pixel_values"])
    with pytest.raises(ValueError):
        pad_batch_to(batches[0], 10, PAD_ID)

    config = tiny_config(2, False)
    args, labels = pack_microbatches(batches, config, SEQ_LEN, PAD_ID, MBS)
    assert [tuple(a.shape) for a in args[:3]] == [(8, SEQ_LEN), (8, SEQ_LEN), (8, 3, SEQ_LEN)]
    patches = [0 if b.get("pixel_values") is None else b["pixel_values"].shape[0] for b in batches]
    assert args[3].shape == (4, max(patches), config.vision.patch_dim) and labels.shape == (8, SEQ_LEN)
    assert torch.equal(args[3][0, : patches[0]], batches[0]["pixel_values"])
    assert (args[4][2] == 0).all()  # the text-only micro-batch has only padding grids


# --------------------------------------------------------------------------------------------------
# Distributed equivalence (2 processes)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    from openspeed.distributed.launch import free_port

    return free_port()


def _launch(world: int, out_dir: str, extra: list[str], timeout: int = 240) -> float:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    )
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), out_dir, *extra],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    return time.perf_counter() - start


def _read_results(out_dir: str, world: int) -> list[dict]:
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json"), encoding="utf-8") as fh:
            results.append(json.load(fh))
    return results


def _check(ranks: list[dict], scenarios) -> None:
    for name, *_ in scenarios:
        per_rank = [r[name] for r in ranks]
        # Every parameter of the full model lives on a pipeline rank (the tied embedding on two).
        owned = set().union(*(set(r["names"]) for r in per_rank))
        assert owned == set(per_rank[0]["full_names"]), (name, set(per_rank[0]["full_names"]) ^ owned)
        for i, r in enumerate(per_rank):
            print(f"{name} rank {i} ({r['seconds']:.1f} s, max |grad| {r['max |grad|']:.2e}): {r['diffs']}")
            for key, value in r["diffs"].items():
                assert value < TOL, (name, i, key, value, r["worst grad"])


def test_pipeline_matches_single_process(tmp_path):
    """pp=2: 1f1b (3 layers, auto split), interleaved 1F1B (explicit 4-stage list), tied embeddings
    across ranks (1f1b) and on one rank (DualPipeV), ZBV zero bubble: loss, every gradient, the
    gradient norm and (for some) ``pipeline_forward_logits`` equal the single process within 1e-5."""
    seconds = _launch(2, str(tmp_path), [])
    _check(_read_results(str(tmp_path), 2), SCENARIOS)
    print(f"2-process pipeline launch: {seconds:.1f} s")


# --------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------


def _reference(config: Qwen2_5_VLConfig, batches: list[dict], num_items: int):
    """Single-process gradient accumulation over ``batches``: (full model, summed loss)."""
    from openspeed.models.init import init_weights
    from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel

    torch.manual_seed(0)
    model = Qwen2_5_VLModel(config)
    init_weights(model, SEED, STD)
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total += float(loss.detach())
    return model, total


def _dcp_roundtrip(parts, config: Qwen2_5_VLConfig, full, path: str) -> dict[str, float]:
    """A DCP checkpoint written by the stages loads into the full model, and the other way round."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel

    state = {}
    for part in parts:
        state.update(part.state_dict())
    dcp.save(state, checkpoint_id=os.path.join(path, "from_pp"))
    torch.manual_seed(123)
    fresh = Qwen2_5_VLModel(config)
    dcp.load(fresh.state_dict(), checkpoint_id=os.path.join(path, "from_pp"))
    into_full = max(
        float((a - b).abs().max()) for a, b in zip(fresh.parameters(), full.parameters(), strict=True)
    )

    with torch.no_grad():
        doubled = {k: v * 2 for k, v in full.state_dict().items()}
    dcp.save(doubled, checkpoint_id=os.path.join(path, "from_full"))
    for part in parts:  # one load per stage module: a same-rank tied pair holds two copies
        dcp.load(part.state_dict(), checkpoint_id=os.path.join(path, "from_full"))
    into_stages = 0.0
    for part in parts:
        for name, value in part.state_dict().items():
            value = value.full_tensor() if isinstance(value, DTensor) else value
            into_stages = max(into_stages, float((value - doubled[name]).abs().max()))
    return {"dcp pp->full": into_full, "dcp full->pp": into_stages}


def _run_scenario(
    dims, scenario, batches: list[dict], all_batches: list[dict] | None = None, checkpoint: str | None = None
) -> dict:
    """Two steps of ``scenario`` on this rank's ``batches``; differences to the single-process reference.

    Under data parallel, ``all_batches`` are every data-parallel rank's micro-batches (the
    reference runs them all) and ``batches`` this rank's share.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openspeed.config import ParallelConfig
    from openspeed.distributed.fsdp import apply_fsdp
    from openspeed.distributed.pipeline import (
        PipelineInferenceModel,
        build_pipeline,
        local_stage_indices,
        norm_exclusions,
        pipeline_forward_logits,
        pipeline_train_step,
        sync_tied_grads,
    )
    from openspeed.inference.generate import greedy_generate
    from openspeed.models.init import init_weights
    from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel, reset_non_persistent_buffers
    from openspeed.models.qwen2_5_vl.pipeline import (
        Qwen2_5_VLPipelinePacker,
        stage_loss,
        stage_modules_for_rank,
    )

    name, layers, tie, schedule, virtual, explicit, check_logits = scenario
    all_batches = all_batches or batches
    config = tiny_config(layers, tie)
    pp = dims.sizes["pp"]
    pp_rank = dims.mesh["pp"].get_local_rank()
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in all_batches)

    # The trainer's path: meta model -> this rank's stages -> FSDP -> to_empty -> buffers -> seeded init.
    with torch.device("meta"):
        meta = Qwen2_5_VLModel(config)
    parallel = ParallelConfig(
        pp=pp, virtual_stages=virtual, pp_schedule=schedule, pipeline_num_layers=explicit
    )
    parts = stage_modules_for_rank(meta, dims, parallel)
    assert [p.stage_index for p in parts] == local_stage_indices(pp_rank, pp, virtual, schedule)
    for part in parts:
        if dims.dp_enabled:
            apply_fsdp(part, dims.dp_mesh(), part.fsdp_blocks())
        part.to_empty(device="cpu")
        reset_non_persistent_buffers(part)
        init_weights(part, SEED, STD)
    packer = Qwen2_5_VLPipelinePacker(config, SEQ_LEN, PAD_ID, MBS)
    pipe = build_pipeline(parts, dims, "cpu", schedule, len(batches), stage_loss, packer)

    # Step 1 in one order, then step 2 with the micro-batches reversed (different pixel sizes at
    # every position): only step 2's gradients are compared.
    pipeline_train_step(pipe, batches, num_items)
    for part in parts:
        part.zero_grad(set_to_none=True)
    order = batches[::-1]
    loss = pipeline_train_step(pipe, order, num_items)
    if dims.dp_enabled:
        dist.all_reduce(loss, group=dims.dp_group())
    sync_tied_grads(pipe)
    from openspeed.training.grads import clip_grad_norm

    params = list(pipe.parameters())
    norm = clip_grad_norm(params, 0.0, pipe.group, norm_exclusions(pipe))

    full, ref_loss = _reference(config, all_batches, num_items)
    ref = dict(full.named_parameters())
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in full.parameters()]))

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    diffs = {"loss": abs(float(loss) - ref_loss), "grad_norm": abs(norm - ref_norm)}
    weights, grads, names = {}, {}, []
    for part in parts:
        for pname, param in part.named_parameters():
            names.append(pname)
            weights[pname] = float((whole(param.detach()) - ref[pname]).abs().max())
            grads[pname] = float((whole(param.grad) - ref[pname].grad).abs().max())
    # Clipping to half the norm scales every gradient (tied copies included) like the full model's.
    clip_grad_norm(params, ref_norm / 2, pipe.group, norm_exclusions(pipe))
    coef = (ref_norm / 2) / (ref_norm + 1e-6)
    diffs["clipped grad"] = max(
        float((whole(param.grad) - ref[pname].grad * coef).abs().max())
        for part in parts
        for pname, param in part.named_parameters()
    )
    if check_logits:  # (FSDP leaves the roots gathered after this: gradients first)
        full.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches[:2]):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = pipeline_forward_logits(pipe, inputs)
                diffs[f"logits mb{i}"] = float((logits - full(**inputs).logits).abs().max())
            inputs = {k: v for k, v in batches[0].items() if k != "labels"}
            last = inputs["attention_mask"].sum(1) - 1
            picked = pipeline_forward_logits(pipe, inputs, last)
            expected = full(**inputs).logits[torch.arange(last.shape[0]), last]
            diffs["logits at positions"] = float((picked - expected).abs().max())
            # The model-like front: evaluation loss and greedy decoding (one forward per token).
            front = PipelineInferenceModel(pipe)
            got = front(**batches[1], num_items_in_batch=1).loss
            diffs["front loss"] = float((got - full(**batches[1], num_items_in_batch=1).loss).abs())
            tokens = greedy_generate(front, inputs, 4, eos_token_id=2, pad_token_id=PAD_ID, early_stop=False)
            expected = greedy_generate(full, inputs, 4, eos_token_id=2, pad_token_id=PAD_ID, early_stop=False)
            diffs["greedy tokens differ"] = float(tokens != expected)
    if checkpoint is not None and tie:
        diffs.update(_dcp_roundtrip(parts, config, full, os.path.join(checkpoint, name)))
    diffs["max grad"] = max(grads.values())
    diffs["max weight"] = max(weights.values())
    return {
        "diffs": diffs,
        "worst grad": max(grads, key=grads.get),
        "max |grad|": float(max(p.grad.abs().max() for p in full.parameters())),
        "names": names,
        "full_names": [n for n, _ in full.named_parameters()],
    }


def _worker(out_dir: str, mode: str) -> None:
    import torch.distributed as dist

    from openspeed.distributed.mesh import build_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dp = dist.get_world_size() // 2
    dims = build_mesh({"pp": 2, "dp_replicate": 1, "dp_shard": dp, "cp": 1, "tp": 1}, "cpu")
    batches = micro_batches()
    # (pp2 x dp_shard2 through the trainer is in test_parallel_layouts.py.)
    everything, mine, scenarios = None, batches, SCENARIOS
    results = {}
    for scenario in scenarios:
        start = time.perf_counter()
        results[scenario[0]] = _run_scenario(dims, scenario, mine, everything, out_dir)
        results[scenario[0]]["seconds"] = time.perf_counter() - start
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pp")
