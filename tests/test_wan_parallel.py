"""Wan DiT under context and tensor parallelism equals one process.

Everything distributed runs in one spawn of two gloo workers (``_worker``); the references are
computed in the same process (tiny random DiTs with every parameter perturbed, so norm weights and
biases are not trivial) or, for training, by a one-process run of the DiT trainer in the test process.

* cp2 (Ulysses with 3 heads over 2 ranks, i.e. uneven, and ring): the forward output (T2V and I2V)
  within 1e-5, every gradient (summed over the cp ranks, as FSDP over dp_shard x cp does) within 1e-5
  relative, and Euler + CFG sampling's final latents within 1e-5.
* tp2: forward within 1e-5 and every gradient within 1e-5 relative (I2V, so the image K/V and their
  head-sharded QK-norm are covered).
* The DiT trainer with tp=2 and with cp=2: 3 steps give the one-process losses within 1e-4 relative.
* Distributed sampling of a trained run (``generate_videos`` with Ulysses over both ranks) gives the
  one-process clip within 1e-5; a token count the ranks cannot split is one ConfigError.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from _spawn import run_workers
from _train_utils import assert_curves_close, train_curve

TOL = 1e-5
TEXT_TOKENS = 512  # the I2V cross-attention takes the last 512 context tokens as text
# 3 heads: Ulysses over 2 ranks splits them unevenly. Grid 3x2x4 = 24 tokens (a multiple of 4 for ring).
CP_T2V = dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
              freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=16)
CP_I2V = dict(CP_T2V, in_channels=12, image_dim=12, added_kv_proj_dim=48)
TP_I2V = dict(CP_I2V, num_attention_heads=2, attention_head_dim=24, ffn_dim=64)
LATENT = (3, 4, 8)


def _model(config: dict, seed: int = 0) -> torch.nn.Module:
    from openspeed.models.wan import WanConfig, WanTransformer

    torch.manual_seed(seed)
    model = WanTransformer(WanConfig(**config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _inputs(config: dict, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    text_tokens = TEXT_TOKENS if "image_dim" in config else 7
    inputs = {
        "hidden_states": torch.randn(2, config["in_channels"], *LATENT, generator=gen),
        "timestep": torch.tensor([937.0, 41.5]),
        "encoder_hidden_states": torch.randn(2, text_tokens, config["text_dim"], generator=gen),
    }
    if "image_dim" in config:
        inputs["encoder_hidden_states_image"] = torch.randn(2, 5, config["image_dim"], generator=gen)
    return inputs


def _forward_backward(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients (full tensors) of ``sum(output * fixed weights)``."""
    from torch.distributed.tensor import DTensor

    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    return out.detach(), grads


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _count_tokens(model: torch.nn.Module, seen: list[int]) -> None:
    """Record the token count the first block's self-attention gets in each forward."""
    model.blocks[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))


def _write(out_dir: str, name: str, diffs: dict) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
        json.dump(diffs, fh)


def _read(out_dir, name: str) -> dict:
    with open(os.path.join(out_dir, name), encoding="utf-8") as fh:
        diffs = json.load(fh)
    for key, value in sorted(diffs.items()):
        print(f"{key}: {value:.2e}")
    return diffs


# --------------------------------------------------------------------------------------------------
# The workers: everything distributed runs in one spawn of two gloo processes
# --------------------------------------------------------------------------------------------------


def _cp_checks(diffs: dict) -> None:
    import torch.distributed as dist

    from openspeed.distributed.context_parallel import ContextParallel
    from openspeed.models.wan.generate import sample_latents
    from openspeed.models.wan.parallelize import apply_context_parallel

    for kind, config in (("t2v", CP_T2V), ("i2v", CP_I2V)):
        inputs = _inputs(config)
        ref_out, ref_grads = _forward_backward(_model(config), inputs)
        for algo in ("ulysses", "ring"):
            cp = ContextParallel.from_group(dist.group.WORLD, algo)
            model = apply_context_parallel(_model(config), cp)
            seen = []
            _count_tokens(model, seen)
            out, grads = _forward_backward(model, inputs)
            assert seen == [24 // 2], seen  # the blocks ran on half of the video tokens
            diffs[f"cp/{kind}/{algo}/forward"] = float((out - ref_out).abs().max())
            worst = 0.0
            for name, grad in grads.items():
                dist.all_reduce(grad)  # each rank holds its tokens' share
                worst = max(worst, _rel(grad, ref_grads[name]))
            diffs[f"cp/{kind}/{algo}/grad"] = worst

    # Sampling: Euler flow matching with classifier-free guidance, the same noise on every rank.
    cp = ContextParallel.from_group(dist.group.WORLD, "ulysses")
    for kind, config in (("t2v", CP_T2V), ("i2v", CP_I2V)):
        gen = torch.Generator().manual_seed(4)
        inputs = _inputs(config)
        text = inputs["encoder_hidden_states"]
        null = torch.randn(1, *text.shape[1:], generator=gen)
        noise = torch.randn(2, config["out_channels"], *LATENT, generator=gen)
        extra = {}
        if kind == "i2v":
            channels = config["in_channels"] - config["out_channels"]
            extra = {"condition": torch.randn(2, channels, *LATENT, generator=gen),
                     "image": inputs["encoder_hidden_states_image"]}
        args = (text, null, noise, 3, 5.0, 3.0)
        ref = sample_latents(_model(config).eval(), *args, **extra)
        model = apply_context_parallel(_model(config), cp).eval()
        seen = []
        _count_tokens(model, seen)
        got = sample_latents(model, *args, **extra)
        assert ref.abs().max() > 0.1 and seen == [24 // 2] * 3, seen
        diffs[f"cp/{kind}/ulysses/sampling"] = float((got - ref).abs().max())


def _tp_checks(diffs: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from openspeed.models.wan.parallelize import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    inputs = _inputs(TP_I2V)
    ref_out, ref_grads = _forward_backward(_model(TP_I2V), inputs)
    model = apply_tensor_parallel(_model(TP_I2V), mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    q = model.blocks[0].self_attn.q_proj.weight
    assert q.to_local().shape[0] == q.shape[0] // 2  # heads really split
    out, grads = _forward_backward(model, inputs)
    diffs["tp/i2v/forward"] = float((out - ref_out).abs().max())
    diffs["tp/i2v/grad"] = max(_rel(grad, ref_grads[name]) for name, grad in grads.items())


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from openspeed.config import load_config
    from openspeed.distributed.context_parallel import ContextParallel
    from openspeed.errors import ConfigError
    from openspeed.models.wan.generate import enable_context_parallel, generate_videos, load_trained_dit
    from openspeed.training.trainer import run_training

    with open(os.path.join(out_dir, "setup.json"), encoding="utf-8") as fh:
        setup = json.load(fh)
    diffs: dict[str, float] = {}
    _cp_checks(diffs)
    _tp_checks(diffs)
    # The DiT trainer over two processes (the process group is the workers').
    for name, overrides in (("tp2", ["parallel.tp=2"]), ("cp2", ["parallel.cp=2"])):
        run_training(load_config(setup["config"], [*overrides, f"train.run_dir={out_dir}/{name}"]))
    # Distributed sampling from the one-process run: Ulysses over both ranks.
    trained = load_trained_dit(setup["reference"])
    enable_context_parallel(trained, ContextParallel.from_group(dist.group.WORLD, "ulysses"))
    videos = generate_videos(trained, [setup["prompt"]], steps=2)
    # 1x16x48 pixels -> a 1x2x6 latent -> 3 video tokens: two ranks cannot split them.
    with pytest.raises(ConfigError, match="has 3 video tokens, not a multiple of 2"):
        generate_videos(trained, [setup["prompt"]], frames=1, width=48, steps=1)
    if rank == 0:
        torch.save(videos, os.path.join(out_dir, "videos_cp2.pt"))
        _write(out_dir, "diffs.json", diffs)


FRAMES, HEIGHT, WIDTH = 5, 16, 32
PROMPT = "a red square moves right"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Set up a tiny pipeline, train it 3 steps in this process (the reference), run the workers."""
    from openspeed.config import load_config
    from openspeed.models.wan.moving_shapes import make_moving_shapes, vocabulary
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline
    from openspeed.training.trainer import run_training

    root = tmp_path_factory.mktemp("wan_parallel")
    pipeline = write_tiny_wan_pipeline(root / "pipe", words=vocabulary(), seed=4, transformer=dict(
        num_attention_heads=2, attention_head_dim=32, ffn_dim=128))
    clips = make_moving_shapes(root / "clips", 4, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=5)
    cfg = {
        "model": {"path": str(pipeline)},
        "data": {"train_path": str(clips), "video_buckets": [f"{FRAMES}x{HEIGHT}x{WIDTH}"], "text_len": 8,
                 "caption_dropout": 0.25},
        "train": {"run_dir": str(root / "ref"), "max_steps": 3, "seed": 11, "micro_batch_size": 2,
                  "global_batch_size": 2, "flow_shift": 3.0},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"interval": 0, "save_final": True},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_training(load_config(str(config)))
    setup = {"config": str(config), "reference": str(root / "ref"), "prompt": PROMPT}
    (root / "setup.json").write_text(json.dumps(setup))
    run_workers(_worker, 2, str(root))
    return root


def test_context_parallel_forward_backward_and_sampling_match_one_process(results):
    diffs = _read(results, "diffs.json")
    cp = {k: v for k, v in diffs.items() if k.startswith("cp/")}
    assert len(cp) == 10
    assert max(cp.values()) < TOL


def test_tensor_parallel_forward_backward_match_one_process(results):
    diffs = _read(results, "diffs.json")
    assert diffs["tp/i2v/forward"] < TOL and diffs["tp/i2v/grad"] < TOL


@pytest.mark.parametrize("layout", ["tp2", "cp2"])
def test_training_matches_one_process(results, layout):
    ref, got = train_curve(str(results / "ref")), train_curve(str(results / layout))
    print(f"{layout} {got} vs one process {ref}")
    assert_curves_close(got, ref, steps=(1, 2, 3))
    assert ref[1][0] != ref[3][0]  # the weights moved


def test_distributed_sampling_matches_one_process(results):
    from openspeed.models.wan.generate import generate_videos, load_trained_dit

    ref = generate_videos(load_trained_dit(str(results / "ref")), [PROMPT], steps=2)
    got = torch.load(results / "videos_cp2.pt")
    err = float((got - ref).abs().max())
    print(f"generate: cp2 vs one process max |diff| = {err:.2e}")
    assert got.shape == ref.shape and err < TOL and ref.abs().max() > 0.1


def test_generate_nproc_is_checked_against_the_launcher(results, monkeypatch, capsys):
    """Inside launched workers a different --nproc is one user error line (no sampling starts)."""
    from openspeed.cli import main

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["generate", "--checkpoint", str(results / "ref"), "--prompt", PROMPT, "--out",
                 str(results / "x.mp4"), "--nproc", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--nproc 3 differs from the launcher's 2 processes" in err
    assert main(["generate", "--checkpoint", str(results / "ref"), "--prompt", PROMPT, "--out", "x.mp4",
                 "--nproc", "0"]) == 2
