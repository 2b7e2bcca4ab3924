"""Qwen2-VL: equal to transformers' ``Qwen2VLForConditionalGeneration``, through the one-loop core.

In process: tiny random references saved sharded against ``openspeed.from_pretrained`` (logits,
loss, gradients, M-RoPE positions, config), the FLOPs formula against torch's counter, greedy
decoding against Hugging Face's ``generate``, the processor's grid against the token expansion, and
freezing. Through the CLI, on the shapes set written by ``openspeed data shapes --family qwen2_vl``
and laid out as mixed text / image / video batches: one process against dp_shard=2, tp=2 with
sequence parallelism and pp=2 (5 fp32 steps), ``convert --to hf`` read back by transformers, a LoRA run whose
``convert --to peft`` adapter peft loads over the reference, ``eval`` and ``chat``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _mixed import write_mixed_set
from _qwen_tiny import IMAGE_BATCH, IMAGE_ID, PAD_ID, TEXT_BATCH, VIDEO_BATCH, VIDEO_ID, make_batch, perturb
from _runs import plain_process  # noqa: F401  (autouse: in-process CLI calls print their errors here)
from _train_utils import assert_curves_close, make_tiny_run_config, run_train, train_curve, write_base_model

import openspeed
from openspeed.cli import main
from openspeed.models.qwen2_vl.config import Qwen2VLConfig

ATOL = 1e-4
BATCHES = {"image": IMAGE_BATCH, "video": VIDEO_BATCH, "text": TEXT_BATCH, "unpadded": IMAGE_BATCH[1:]}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}


def hf_config(tie_word_embeddings: bool = False):
    """A tiny ``transformers.Qwen2VLConfig`` (the text side is the Qwen2.5-VL fixtures')."""
    from transformers import Qwen2VLConfig as HFConfig

    return HFConfig(
        text_config=dict(
            vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=192, vision_end_token_id=193,
        tie_word_embeddings=tie_word_embeddings,
    )


def random_hf_model(seed: int = 0, tie_word_embeddings: bool = False):
    """A tiny fp32 reference whose weights are re-drawn so no norm scale is 1 and no bias 0."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return perturb(Qwen2VLForConditionalGeneration._from_config(
        hf_config(tie_word_embeddings), attn_implementation="sdpa", dtype=torch.float32
    ))


def _inputs(name: str, seed: int = 1) -> dict:
    batch = make_batch(BATCHES[name], seed=seed)
    batch.pop("second_per_grid_ts", None)  # Qwen2-VL has no seconds per grid
    return batch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(reference, native loaded from its sharded save_pretrained directory, the directory)."""
    hf = random_hf_model()
    out = tmp_path_factory.mktemp("qwen2_vl_ref")
    hf.save_pretrained(out, max_shard_size="40KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    return hf, openspeed.from_pretrained(str(out)), str(out)


@pytest.mark.parametrize("name", list(BATCHES))
def test_logits_and_loss_match_hf(saved, name):
    hf, native, _ = saved
    batch = _inputs(name)
    with torch.no_grad():
        ref, out = hf(**batch), native(**batch)
    real = batch["attention_mask"].bool()
    diff = (ref.logits - out.logits)[real].abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e}, loss {out.loss.item():.6f} vs {ref.loss.item():.6f}")
    assert type(native).__name__ == "Qwen2VLModel"
    assert diff < ATOL
    assert abs(ref.loss.item() - out.loss.item()) < ATOL


def test_gradients_match_hf(saved):
    hf, native, _ = saved
    from openspeed.models.qwen2_5_vl.convert import native_to_hf

    batch = _inputs("video")
    hf.zero_grad()
    native.zero_grad()
    hf(**batch).loss.backward()
    native(**batch).loss.backward()
    theirs = {k: p.grad for k, p in hf.named_parameters()}
    ours = native_to_hf({k: p.grad for k, p in native.named_parameters()}, native.config)
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() / (theirs[k].abs().max().item() + 1e-12) for k in ours)
    print(f"worst relative gradient difference over {len(ours)} tensors: {worst:.2e}")
    assert worst < 1e-4
    assert all(theirs[k].abs().max() > 0 for k in theirs if k.startswith("model.visual."))


def test_rope_index_counts_frame_groups_as_hf(saved):
    hf, native, _ = saved
    from openspeed.models.qwen2_5_vl.model import mrope_position_ids

    batch = _inputs("video")
    ref, _ = hf.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"), batch["video_grid_thw"],
        batch["attention_mask"],
    )
    ours = mrope_position_ids(native.config, batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                              batch["video_grid_thw"], torch.tensor([0.5, 0.75]))  # seconds are not read
    real = batch["attention_mask"].bool()
    assert torch.equal(ours[:, real], ref[:, real])


def test_config_round_trips_and_tied_embeddings_load(saved, tmp_path):
    from transformers import Qwen2VLConfig as HFConfig

    _, native, path = saved
    config = native.config
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        written = json.load(fh)
    assert Qwen2VLConfig.from_hf_dict(written) == config
    back = HFConfig(**config.to_hf_dict())
    assert Qwen2VLConfig.from_hf_dict(back.to_dict()) == config
    assert (back.vision_config.embed_dim, back.vision_config.mlp_ratio, back.vision_config.hidden_size) == (32, 2, 64)
    assert config.vision.intermediate_size == 64 and config.vision.hidden_act == "quick_gelu"

    tied = random_hf_model(seed=2, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path)
    model = openspeed.from_pretrained(str(tmp_path))
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    batch = _inputs("image")
    with torch.no_grad():
        diff = (tied(**batch).logits - model(**batch).logits)[batch["attention_mask"].bool()].abs().max()
    assert diff < ATOL


def test_flops_equal_counted_flops(saved):
    """Vision tower + merger: analytic = 3 x counted forward FLOPs exactly; the decoder's matmuls too
    (its attention is counted dense by torch, causal by the formula, so it is checked apart)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from openspeed.models.qwen2_5_vl.flops import flops_breakdown

    _, native, _ = saved
    batch = _inputs("unpadded")
    batch.pop("labels")
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        native(**batch)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    grids = batch["image_grid_thw"]
    seq = batch["input_ids"].shape[1]
    num_text = seq - int(grids.prod(-1).sum()) // 4
    parts = flops_breakdown(native.config, num_text, grids)
    vision = counts["Qwen2VLModel.visual"]
    assert 3 * vision == parts["vision_matmul"] + parts["vision_attention"] + parts["merger_matmul"]
    text = native.config.text
    dense_attention = 4 * seq * seq * text.num_attention_heads * text.head_dim * text.num_hidden_layers
    decoder = counts["Qwen2VLModel.language_model"] + counts["Qwen2VLModel.lm_head"]
    assert 3 * (decoder - dense_attention) == parts["llm_matmul"]
    assert counts["Global"] == vision + decoder


def test_hf_generate_matches(saved):
    """Greedy decoding with the KV cache equals Hugging Face's ``generate`` on a left-padded batch
    holding images and a video."""
    from openspeed.inference import greedy_generate

    hf, native, _ = saved
    prompts = [
        [("text", 5), ("image", [1, 8, 12]), ("text", 4)],
        [("text", 3), ("image", [1, 6, 10]), ("text", 2), ("image", [1, 4, 4]), ("text", 3)],
        [("text", 2), ("video", [2, 4, 6], 1.0), ("text", 5)],
    ]
    right = _left_pad(make_batch(prompts, seed=5))
    right.pop("labels")
    right.pop("second_per_grid_ts")
    never = 199
    with torch.no_grad():
        out = hf.generate(**right, max_new_tokens=6, do_sample=False, eos_token_id=never, pad_token_id=PAD_ID)
    theirs = out[:, right["input_ids"].shape[1]:].tolist()
    assert greedy_generate(native, right, 6, never, PAD_ID) == theirs


def _left_pad(batch: dict) -> dict:
    mask = batch["attention_mask"]
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        rows = []
        for row, m in zip(batch[key], mask):
            n = int(m.sum())
            fill = PAD_ID if key == "input_ids" else (-100 if key == "labels" else 0)
            rows.append(torch.cat([torch.full((len(row) - n,), fill, dtype=row.dtype), row[:n]]))
        out[key] = torch.stack(rows)
    return out


def test_freezing_each_part(saved):
    from openspeed.models.registry import get_model_spec
    from openspeed.training.model_setup import apply_freeze

    _, native, _ = saved
    spec = get_model_spec("qwen2_vl")
    names = [n for n, _ in native.named_parameters()]
    assert {spec.part_of(n) for n in names} == {"vision", "merger", "llm"}
    for part in ("vision", "merger", "llm"):
        model = spec.build(native.config)
        apply_freeze(model, spec, [part])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {n for n in names if spec.part_of(n) == part}
        assert all(n.startswith("visual.merger.") for n in frozen) == (part == "merger")


# --------------------------------------------------------------------------------------------------
# Through the CLI, on the shapes set with a Qwen2-VL model directory
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qwen2_vl_shapes"))
    assert main(["data", "shapes", "--family", "qwen2_vl", "--out", out, "--num", "48"]) == 0
    return out


def test_shapes_model_dir_and_processor(shapes, capsys):
    """The written directory is a Qwen2-VL model transformers reads; the processor's grids match
    transformers' Qwen2-VL image processor, and each image expands to grid / merge^2 pad tokens."""
    from PIL import Image
    from transformers import Qwen2VLConfig as HFConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from openspeed.data.conversation import ConversationDataset
    from openspeed.data.processor import VLProcessor

    model_dir = os.path.join(shapes, "model")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["model_type"] == "qwen2_vl" and HFConfig(**config).vision_config.hidden_act == "quick_gelu"
    processor = VLProcessor.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json"), encoding="utf-8") as fh:
        keys = json.load(fh)
    reference = Qwen2VLImageProcessorPil(**{k: keys[k] for k in ("min_pixels", "max_pixels", "patch_size",
                                                                 "merge_size", "temporal_patch_size")})
    image = Image.open(os.path.join(shapes, "images", "000000.png")).convert("RGB")
    pixels, grid = processor.process_images([image])
    ref = reference(images=[image], return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-5, rtol=1e-5)
    sample = ConversationDataset(os.path.join(shapes, "train.jsonl"), processor, max_seq_len=256)[0]
    pads = int((sample["input_ids"] == processor.image_token_id).sum())
    assert pads == int(sample["image_grid_thw"].prod()) // 4

    assert main(["data", "shapes", "--family", "wan", "--out", os.path.join(shapes, "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("wan cannot train on the shapes set (families that can: qwen2_5_vl, qwen2_vl)")


@pytest.fixture(scope="module")
def mixed_run(shapes, tmp_path_factory):
    """(config, run dir, curve): one process, 5 fp32 steps over mixed text / image / video batches."""
    root = str(tmp_path_factory.mktemp("qwen2_vl_mixed"))
    config = write_mixed_set(shapes, root)
    run_dir = os.path.join(root, "one")
    result = run_train(config, "train.run_dir=" + run_dir, "checkpoint.save_final=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped samples: 0" in result.stderr
    return config, run_dir, train_curve(run_dir)


LAYOUTS = {
    "dp_shard2": "parallel.dp_shard=2",
    "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "pp2": "parallel.pp=2",
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_layouts_match_one_process(layout, mixed_run, tmp_path):
    config, _, reference = mixed_run
    run_dir = str(tmp_path / "run")
    result = run_train(config, "--nproc", "2", *layout.split(), "train.run_dir=" + run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(run_dir), reference)
    assert reference[5][0] < reference[1][0]


def _shapes_batch(shapes: str, n: int = 3) -> dict:
    from openspeed.data.collator import VLCollator
    from openspeed.data.conversation import ConversationDataset
    from openspeed.data.processor import VLProcessor

    processor = VLProcessor.from_pretrained(os.path.join(shapes, "model"))
    dataset = ConversationDataset(os.path.join(shapes, "train.jsonl"), processor, max_seq_len=256)
    full = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)(
        [dataset[i] for i in range(n)]
    )
    return {k: full[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}


def _real_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def test_hf_export_loads_in_transformers(mixed_run, shapes, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from openspeed.training.run_loading import load_trained

    _, run_dir, _ = mixed_run
    assert main(["convert", run_dir, "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = _shapes_batch(shapes)
    diff = (_real_logits(hf.eval(), batch) - _real_logits(load_trained(run_dir).model, batch)).abs().max()
    print(f"convert --to hf: max |logit diff| vs the native run {diff:.2e}")
    assert diff < ATOL


def test_eval_and_chat_on_the_run(mixed_run, shapes, tmp_path):
    from openspeed.data.collator import VLCollator
    from openspeed.data.processor import VLProcessor
    from openspeed.inference.chat import answer_one
    from openspeed.inference.generate import build_prompt_sample, greedy_generate
    from openspeed.training.run_loading import load_trained

    _, run_dir, _ = mixed_run
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", run_dir, "--data", os.path.join(shapes, "eval.tsv"), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["n"] == 5 and summary["step"] == 5 and summary["skipped"] == 0

    trained = load_trained(run_dir)
    processor = VLProcessor.from_pretrained(os.path.join(shapes, "model"))
    image = os.path.join(shapes, "images", "000001.png")
    question = "What colour is the shape?"
    sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + question}], [image])
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    tokens = greedy_generate(trained.model, collate([sample]), 6, processor.eos_token_id, processor.pad_token_id)
    expected = processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert answer_one(run_dir, question, [image], max_new_tokens=6) == expected


def test_lora_adapter_loads_in_peft(shapes, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from openspeed.training.run_loading import load_lora_run

    base = write_base_model(shapes, str(tmp_path / "base"))
    config = make_tiny_run_config(
        str(tmp_path), shapes, model={"path": base, "rope_theta": None, "lora": dict(LORA)},
        optim={"lr": 2e-2, "warmup_steps": 1}, data={"val_path": ""},
        train={"micro_batch_size": 2, "global_batch_size": 4}, checkpoint={"interval": 0, "save_final": True},
    )
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = str(tmp_path / "run")
    curve = train_curve(run_dir)
    assert curve[5][0] < curve[1][0]

    assert main(["convert", run_dir, "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.visual.blocks.0.attn.qkv" in adapter["target_modules"]
    assert "model.language_model.layers.0.mlp.gate_proj" in adapter["target_modules"]
    batch = _shapes_batch(shapes)
    hf_base = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = _real_logits(hf_base, batch)
    peft_model = PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
    ours = _real_logits(load_lora_run(run_dir).model, batch)
    moved, diff = (ours - base_logits).abs().max().item(), (ours - _real_logits(peft_model, batch)).abs().max().item()
    print(f"LoRA vs base: {moved:.3e}; peft over transformers vs native LoRA: {diff:.3e}")
    assert moved > 1e-3
    assert diff < ATOL
