"""LoRA on Qwen2.5-VL: only adapters train and are saved, peft / merged exports, TP and FSDP2 layouts.

One LoRA run (one process, 5 fp32 steps through the CLI, rank 4 on the LLM and the vision tower,
over an HF-format base with weights) serves as the reference: the exports must reproduce its model,
and tp2 / dp_shard2 runs must reproduce its losses.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _train_utils import assert_curves_close, make_tiny_run_config, run_train, train_curve, write_base_model

from openspeed.cli import main
from openspeed.config import RunConfig, dump_yaml
from openspeed.data.collator import VLCollator
from openspeed.data.conversation import ConversationDataset
from openspeed.data.processor import VLProcessor
from openspeed.lora import LoRALinear, lora_modules, merge_lora
from openspeed.models.loading import load_hf_state_dict
from openspeed.training.model_setup import model_config_from_run
from openspeed.training.run_loading import load_lora_run

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def _lora_config(tmp: str, shapes_dir: str, base: str, **sections) -> str:
    # lr 2e-2: adapters move well away from B = 0 in 5 steps. No validation set: these tests compare
    # training losses and exported models, and decoding under tp is slow on CPU.
    values = {
        "model": {"path": base, "rope_theta": None, "lora": dict(LORA)},
        "optim": {"lr": 2e-2, "warmup_steps": 1},
        "data": {"val_path": ""},
        "train": {"micro_batch_size": 2, "global_batch_size": 4},
        "checkpoint": {"interval": 0, "save_final": True},
    }
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    return make_tiny_run_config(tmp, shapes_dir, **values)


@pytest.fixture(scope="module")
def lora_run(shapes_dir, tmp_path_factory):
    """(run_dir, base model dir, losses) of the one-process reference LoRA run."""
    tmp = str(tmp_path_factory.mktemp("lora_ref"))
    base = write_base_model(shapes_dir, os.path.join(tmp, "base"))
    result = run_train(_lora_config(tmp, shapes_dir, base))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA rank 4 on 38 layers" in result.stderr
    run_dir = os.path.join(tmp, "run")
    return run_dir, base, train_curve(run_dir)


@pytest.fixture(scope="module")
def batch(shapes_dir):
    """Three image questions of the shapes set, right-padded: the inputs every model is compared on."""
    processor = VLProcessor.from_pretrained(os.path.join(shapes_dir, "model"))
    dataset = ConversationDataset(os.path.join(shapes_dir, "train.jsonl"), processor, max_seq_len=256)
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    full = collate([dataset[i] for i in range(3)])
    return {k: full[k] for k in MODEL_INPUTS}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # real tokens only


def test_only_adapters_train_and_are_saved(lora_run):
    run_dir, base, losses = lora_run
    assert losses[5] < losses[1]
    trained = load_lora_run(run_dir)
    adapters = lora_modules(trained.model)
    assert any(name.startswith("visual.blocks.") for name in adapters)  # the vision tower is adapted too
    assert any(name.startswith("language_model.layers.") for name in adapters)
    # Base weights are bitwise the ones the run started from; every adapter's B moved off zero.
    hf = trained.spec.hf_to_native(load_hf_state_dict(base), trained.config)
    for name, param in trained.model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(param, hf[name]), name
    assert all(m.lora_B.weight.abs().max() > 1e-3 for m in adapters.values())
    # The checkpoint holds adapters (and their optimizer state) only.
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(trained.checkpoint).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == 2 * len(adapters) and all(".lora_" in k for k in model_keys)
    assert all(".lora_" in k for k in keys if k.startswith("optim.state."))


def test_peft_round_trip(lora_run, batch, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    run_dir, base, _ = lora_run
    assert main(["convert", run_dir, "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(base)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert "model.visual.blocks.0.attn.qkv" in config["target_modules"]
    assert "model.language_model.layers.0.self_attn.q_proj" in config["target_modules"]

    native = load_lora_run(run_dir).model
    hf_base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = _logits(hf_base, batch)
    peft_model = PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
    ours, theirs = _logits(native, batch), _logits(peft_model, batch)
    moved = (ours - base_logits).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"LoRA vs base: {moved:.3e}; peft vs native LoRA: {diff:.3e}")
    assert moved > 1e-3  # the adapters were trained
    assert diff < 1e-4


def test_merged_exports_equal_the_lora_model(lora_run, batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    run_dir, _, _ = lora_run
    lora_model = load_lora_run(run_dir).model
    reference = _logits(lora_model, batch)
    merged = merge_lora(load_lora_run(run_dir).model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    merged_diff = (_logits(merged, batch) - reference).abs().max().item()

    assert main(["convert", run_dir, "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_diff = (_logits(hf.eval(), batch) - reference).abs().max().item()
    print(f"merged native vs LoRA: {merged_diff:.3e}; merged HF export vs LoRA: {hf_diff:.3e}")
    assert merged_diff < 1e-5
    assert hf_diff < 1e-4


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.dp_shard=2"], ids=["tp2", "dp_shard2"])
def test_lora_layouts_match_one_process(layout, lora_run, shapes_dir, tmp_path):
    _, base, reference = lora_run
    config = _lora_config(str(tmp_path), shapes_dir, base, checkpoint={"save_final": False})
    result = run_train(config, "--nproc", "2", layout, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = train_curve(str(tmp_path / "run"))
    worst = max(abs(curve[s][0] - reference[s][0]) / abs(reference[s][0]) for s in reference)
    print(f"{layout}: max relative loss difference {worst:.1e}")
    assert_curves_close(curve, reference, rel=1e-4)


def test_bad_lora_settings_are_one_clear_error(shapes_dir, tmp_path):
    from openspeed.config import load_config
    from openspeed.errors import ConfigError
    from openspeed.lora import add_adapters

    cfg = RunConfig()
    cfg.model.path = os.path.join(shapes_dir, "model")
    cfg.model.lora.rank = 4
    cfg.model.lora.targets = ["q_proj", "qkv_nope"]
    spec, config = model_config_from_run(cfg)
    with torch.device("meta"):
        model = spec.build(config)
    with pytest.raises(ConfigError, match=r"^model.lora.targets: 'qkv_nope' matches no linear layer of the model$"):
        add_adapters(model, spec, cfg.model.lora)
    # Hugging Face spellings and globs name the same layers as native ones.
    cfg.model.lora.targets = ["model.visual.blocks.1.attn.qkv", "language_model.layers.*.mlp.down_proj"]
    assert add_adapters(model, spec, cfg.model.lora) == ["visual.blocks.1.attn.qkv"] + [
        f"language_model.layers.{i}.mlp.down_proj" for i in range(config.text.num_hidden_layers)
    ]
    # A head tied to the embedding cannot carry its own update.
    config.tie_word_embeddings = True
    with torch.device("meta"):
        tied = spec.build(config)
    cfg.model.lora.targets = ["lm_head"]
    with pytest.raises(ConfigError, match=r"^model.lora.targets: lm_head is tied to the input embedding"):
        add_adapters(tied, spec, cfg.model.lora)
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora:\n    rank: 4\n    dropout: 1.0\n")
    with pytest.raises(ConfigError, match=r"^model.lora.dropout: must be in \[0, 1\), got 1.0$"):
        load_config(str(path))


def _peft_export_error(tmp_path, capsys, model_path: str, rope_theta: float | None) -> str:
    """The one error line of ``--to peft`` on a LoRA run (no checkpoint) over ``model_path``."""
    cfg = RunConfig()
    cfg.model.path = model_path
    cfg.model.rope_theta = rope_theta
    cfg.model.lora.rank = 4
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    dump_yaml(cfg, str(run_dir / "config.yaml"))
    capsys.readouterr()
    assert main(["convert", str(run_dir), "--to", "peft", "--out", str(tmp_path / "peft")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "export the merged model with --to hf" in errors[0], errors
    assert not (tmp_path / "peft").exists()
    return errors[0]


def test_peft_export_needs_the_runs_base_model(lora_run, shapes_dir, tmp_path, capsys):
    # peft would load the adapter over model.path as it is: a base drawn from the seed (no weights
    # there) or changed by the run (model.rope_theta) is refused in one line; the merged export works.
    seeded = _peft_export_error(tmp_path, capsys, os.path.join(shapes_dir, "model"), None)
    assert seeded.startswith("error: --to peft: the run's base model") and "has no weights" in seeded
    assert main(["convert", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    overridden = _peft_export_error(tmp_path, capsys, lora_run[1], 10.0)
    assert overridden.startswith("error: --to peft: the run changed the base model's config")


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=3, alpha=6, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    expected = base + dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - (base + x @ layer.delta_weight().T)).abs().max() > 1e-3  # the dropout did act
    layer.eval()
    assert torch.allclose(layer(x), x @ (layer.weight + layer.delta_weight()).T + layer.bias, atol=1e-6)



def test_chat_and_eval_load_a_lora_run(lora_run, shapes_dir):
    # chat / eval open runs through load_trained: a LoRA run gives its base weights plus its adapters.
    from openspeed.inference.chat import answer_one
    from openspeed.inference.generate import build_prompt_sample, greedy_generate
    from openspeed.training.run_loading import load_trained

    run_dir, _, _ = lora_run
    trained = load_trained(run_dir)
    reference = load_lora_run(run_dir).model
    assert set(lora_modules(trained.model)) == set(lora_modules(reference))
    for (name, a), (_, b) in zip(trained.model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name

    processor = VLProcessor.from_pretrained(trained.run_config.model.path)
    image = os.path.join(shapes_dir, "images", sorted(os.listdir(os.path.join(shapes_dir, "images")))[0])
    question = "What colour is the shape?"
    messages = [{"role": "user", "content": "<image>" + question}]
    sample = build_prompt_sample(processor, messages, [image])
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    tokens = greedy_generate(reference, collate([sample]), 6, processor.eos_token_id, processor.pad_token_id)
    expected = processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert answer_one(run_dir, question, [image], max_new_tokens=6) == expected
