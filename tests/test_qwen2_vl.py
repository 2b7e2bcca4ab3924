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
from _qwen_tiny import IMAGE_BATCH, IMAGE_ID, PAD_ID, TEXT_BATCH, VIDEO_BATCH, VIDEO_ID, make_batch, perturb
from _runs import plain_process  # noqa: F401  (autouse: in-process CLI calls print their errors here)
from _vlm_family import (
    ATOL,
    check_eval_and_chat,
    check_freezing,
    check_hf_export,
    check_layout,
    check_lora_peft,
    left_pad,
    mixed_reference,
    shapes_set,
)

import openspeed
from openspeed.cli import main
from openspeed.models.qwen2_vl.config import Qwen2VLConfig

BATCHES = {"image": IMAGE_BATCH, "video": VIDEO_BATCH, "text": TEXT_BATCH, "unpadded": IMAGE_BATCH[1:]}


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
    right = left_pad(make_batch(prompts, seed=5), PAD_ID)
    right.pop("labels")
    right.pop("second_per_grid_ts")
    never = 199
    with torch.no_grad():
        out = hf.generate(**right, max_new_tokens=6, do_sample=False, eos_token_id=never, pad_token_id=PAD_ID)
    theirs = out[:, right["input_ids"].shape[1]:].tolist()
    assert greedy_generate(native, right, 6, never, PAD_ID) == theirs


def test_freezing_each_part(saved):
    from openspeed.models.registry import get_model_spec

    _, native, _ = saved
    check_freezing(lambda: get_model_spec("qwen2_vl").build(native.config), get_model_spec("qwen2_vl"),
                   ("vision", "merger", "llm"))


# --------------------------------------------------------------------------------------------------
# Through the CLI, on the shapes set with a Qwen2-VL model directory
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_set("qwen2_vl", str(tmp_path_factory.mktemp("qwen2_vl_shapes")))


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
        assert HFConfig(**json.load(fh)).vision_config.hidden_act == "quick_gelu"
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
    assert err[-1].endswith("wan cannot train on the shapes set (families that can: llava, qwen2_5_vl, qwen2_vl)")


@pytest.fixture(scope="module")
def mixed_run(shapes, tmp_path_factory):
    """(config, run dir, curve): one process, 5 fp32 steps over mixed text / image / video batches."""
    return mixed_reference(shapes, str(tmp_path_factory.mktemp("qwen2_vl_mixed")))


LAYOUTS = {
    "dp_shard2": "parallel.dp_shard=2",
    "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "pp2": "parallel.pp=2",
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_layouts_match_one_process(layout, mixed_run, tmp_path):
    config, _, reference = mixed_run
    check_layout(config, reference, layout, str(tmp_path / "run"))


def test_hf_export_loads_in_transformers(mixed_run, shapes, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    check_hf_export(mixed_run[1], shapes, str(tmp_path / "hf"), Qwen2VLForConditionalGeneration, dict)


def test_eval_and_chat_on_the_run(mixed_run, shapes, tmp_path):
    check_eval_and_chat(mixed_run[1], shapes, str(tmp_path / "eval"))


def test_lora_adapter_loads_in_peft(shapes, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    check_lora_peft(shapes, str(tmp_path), Qwen2VLForConditionalGeneration,
                    ("model.visual.blocks.0.attn.qkv", "model.language_model.layers.0.mlp.gate_proj"), dict)
