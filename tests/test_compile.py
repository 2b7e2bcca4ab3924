"""``train.compile``: compiled transformer blocks give the eager model's losses and gradients.

* In one process, on a tiny Qwen2.5-VL (an image row and a text-only row) and a tiny Wan DiT: each
  block compiled with ``aot_eager`` (traced forward and backward graphs, no code generation) gives
  the eager loss and every parameter gradient within 1e-5 relative, plain, with LoRA adapters and
  with selective / full recomputation; and one inductor smoke test (generated C++ kernels).
* Through the CLI at dp_shard=2 (FSDP2 + compile), 5 fp32 steps from the layouts' one-process eager
  reference: losses and gradient norms within 1e-5, the compile time in the run log.
* Layouts that do not compile on this torch are one-line errors when asked for.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _qwen_tiny import make_batch, native_config
from _train_utils import assert_curves_close, make_tiny_run_config, read_metrics, run_train, train_curve

from openspeed.errors import ConfigError

BATCH = [[("text", 5), ("image", [1, 8, 8]), ("answer", 6)], [("text", 3), ("answer", 4)]]


def _qwen(lora: bool = False, recompute: str = "none"):
    from openspeed.config import LoRAConfig, MemoryConfig
    from openspeed.lora import add_adapters
    from openspeed.memory.apply import apply_memory_config
    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("qwen2_5_vl")
    torch.manual_seed(0)
    model = spec.build(native_config())
    if lora:
        from openspeed.models.qwen2_5_vl.family import LORA_TARGETS

        add_adapters(model, spec, LoRAConfig(rank=4, alpha=8, targets=list(LORA_TARGETS)))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)  # LoRA B non-zero too, so the adapters change the output
    spec.reset_buffers(model)
    if recompute != "none":
        apply_memory_config(model, MemoryConfig(recompute=recompute), spec.memory_plan(model))
    return spec, model


def _grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(eager, compiled, batch, rel: float) -> None:
    from openspeed.training.compile import CompileClock

    loss, grads = _grads(eager, batch)
    torch._dynamo.reset()
    clock = CompileClock.started()
    compiled_loss, compiled_grads = _grads(compiled, batch)
    assert clock.compilations >= 2 and clock.seconds > 0  # the blocks really ran compiled
    assert compiled_loss == pytest.approx(loss, rel=rel)
    assert sorted(compiled_grads) == sorted(grads) and grads
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name  # every parameter takes part, so a zeroed gradient cannot pass
        assert float((compiled_grads[name] - grad).abs().max()) <= rel * scale, name


@pytest.mark.parametrize("lora,recompute", [(False, "none"), (True, "selective"), (False, "full")],
                         ids=["plain", "lora_selective", "full_recompute"])
def test_compiled_qwen_blocks_equal_eager(lora, recompute):
    from openspeed.training.compile import compile_blocks

    spec, eager = _qwen(lora, recompute)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, spec, "aot_eager") == 4 + 2  # vision blocks + decoder layers
    before = set(dict(compiled.named_parameters()))
    _assert_same_step(eager, compiled, make_batch(BATCH), rel=1e-5)
    assert set(dict(compiled.named_parameters())) == before  # names untouched (checkpoints, adapters)


def test_compiled_wan_blocks_equal_eager():
    from openspeed.models.registry import get_model_spec
    from openspeed.models.wan import WanConfig
    from openspeed.training.compile import compile_blocks

    spec = get_model_spec("WanTransformer3DModel")
    torch.manual_seed(0)
    eager = spec.build(WanConfig(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                 text_dim=18, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=16))
    for param in eager.parameters():
        torch.nn.init.normal_(param, std=0.1)
    spec.reset_buffers(eager)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, spec, "aot_eager") == 2
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 2, 8, 8, generator=gen)
    batch = dict(hidden_states=latents, timestep=torch.tensor([100.0, 700.0]),
                 encoder_hidden_states=torch.randn(2, 6, 18, generator=gen))

    def grads(model):
        out = model(**batch)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        loss = out.float().pow(2).mean()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, ref = grads(eager)
    compiled_loss, got = grads(compiled)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    assert sorted(got) == sorted(ref) and ref
    for name, grad in ref.items():
        assert float((got[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()) + 1e-12, name


def test_inductor_smoke():
    """Generated kernels (inductor's C++ backend here) on the decoder: the eager values within float rounding."""
    from openspeed.training.compile import compile_blocks

    spec, eager = _qwen()
    compiled = copy.deepcopy(eager)
    for layer in compiled.language_model.layers:  # the decoder only: one compilation, a few seconds
        layer.forward = torch.compile(layer.forward, backend="inductor")
        layer._openspeed_compiled = True
    assert compile_blocks(compiled, spec, "aot_eager") == 6  # the vision blocks still get aot_eager
    _assert_same_step(eager, compiled, make_batch(BATCH), rel=1e-4)


def test_layouts_that_do_not_compile_are_one_line_errors():
    from openspeed.config import from_dict
    from openspeed.models.registry import get_model_spec
    from openspeed.training.compile import check_compile, compile_enabled

    cfg = from_dict({"train": {"compile": True}})
    spec = get_model_spec("qwen2_5_vl")
    check_compile(cfg, {"tp": 1, "cp": 1, "pp": 2}, spec)
    for sizes, says in (({"tp": 2, "cp": 1}, "parallel.tp=2"), ({"tp": 1, "cp": 2}, "parallel.cp=2")):
        with pytest.raises(ConfigError, match=says) as err:
            check_compile(cfg, sizes, spec)
        assert "\n" not in str(err.value)
    assert compile_enabled(from_dict({}), "cuda") and compile_enabled(from_dict({}), "npu")
    assert not compile_enabled(from_dict({}), "cpu")
    assert not compile_enabled(from_dict({"train": {"compile": False}}), "cuda")


def test_compiled_fsdp_run_matches_eager_one_process(reference_run, warm_shapes_dir, tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    result = run_train(config, "--nproc", "2", "parallel.dp_shard=2", "train.compile=true",
                       "train.compile_backend=aot_eager")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(str(tmp_path / "run")), train_curve(ref_dir), rel=1e-5)
    assert "train.compile:" in result.stderr
    records = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert all(r["compile_s"] > 0 for r in records)

    refused = run_train(config, "--nproc", "2", "parallel.tp=2", "train.compile=true", "train.overwrite=true")
    assert refused.returncode != 0 and "parallel.tp=2" in refused.stderr
    assert "Traceback" not in refused.stderr
