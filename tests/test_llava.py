"""LLaVA (1.5): equal to transformers' ``LlavaForConditionalGeneration``, through the one-loop core.

In process: tiny random references (both feature selections: layer -2 without the class token, and
a list of layers with it) saved sharded against ``openspeed.from_pretrained`` (logits, loss,
gradients, config, both checkpoint layouts), the FLOPs formula against torch's counter, greedy
decoding against ``generate``, the image processors against transformers', and freezing. Through the
CLI, on the shapes set written by ``openspeed data shapes --family llava`` laid out as mixed text /
image batches: one process against dp_shard=2, tp=2 with sequence parallelism, pp=2 and cp=2 with
selective recompute (5 fp32 steps), ``convert --to hf``, ``eval``, ``chat`` and a LoRA run's peft adapter.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _qwen_tiny import perturb
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
from openspeed.models.llava.config import LlavaConfig

IMAGE_ID, PAD_ID, IMAGE, PATCH = 190, 0, 16, 4
SELECTIONS = {"layer-2_default": (-2, "default"), "layers0,2_full": ([0, 2], "full")}


def hf_config(feature_layer=-2, strategy="default", tie_word_embeddings=False):
    from transformers import LlavaConfig as HFConfig

    return HFConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=IMAGE, patch_size=PATCH),
        text_config=dict(model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=tie_word_embeddings),
        image_token_index=IMAGE_ID, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie_word_embeddings,
    )


def random_hf_model(seed: int = 0, **kwargs):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return perturb(LlavaForConditionalGeneration._from_config(hf_config(**kwargs), attn_implementation="sdpa",
                                                              dtype=torch.float32))


def make_batch(rows: list[list], tokens_per_image: int, seed: int = 0) -> dict:
    """Right-padded rows of ``("text", n)``, ``("answer", n)`` (labelled) and ``"image"`` pieces."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels, images = [], [], 0
    for pieces in rows:
        row, lab = [], []
        for piece in pieces:
            if piece == "image":
                row += [IMAGE_ID] * tokens_per_image
                lab += [-100] * tokens_per_image
                images += 1
                continue
            kind, n = piece
            tokens = torch.randint(3, 180, (n,), generator=gen).tolist()
            row += tokens
            lab += tokens if kind == "answer" else [-100] * n
        ids.append(row)
        labels.append(lab)
    length = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([r + [PAD_ID] * (length - len(r)) for r in ids]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ids]),
        "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
    }
    if images:
        batch["pixel_values"] = torch.randn(images, 3, IMAGE, IMAGE, generator=gen)
    return batch


BATCHES = {
    "one_image_each": [[("text", 3), "image", ("answer", 5)], [("text", 6), "image", ("text", 2), ("answer", 3)]],
    "two_images_in_one": [[("text", 2), "image", ("text", 2), "image", ("answer", 4)], [("text", 4), "image",
                                                                                      ("answer", 2)]],
    "text_rows": [[("text", 5), ("answer", 6)], [("text", 2), ("answer", 3)]],
}


@pytest.fixture(scope="module", params=list(SELECTIONS), ids=list(SELECTIONS))
def saved(request, tmp_path_factory):
    """(reference, native from its sharded save_pretrained directory, directory) per feature selection."""
    layer, strategy = SELECTIONS[request.param]
    hf = random_hf_model(feature_layer=layer, strategy=strategy)
    out = tmp_path_factory.mktemp("llava_ref")
    hf.save_pretrained(out, max_shard_size="40KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    return hf, openspeed.from_pretrained(str(out)), str(out)


def _inputs(native, name: str, seed: int = 1) -> dict:
    return make_batch(BATCHES[name], native.config.vision.tokens_per_image, seed)


@pytest.mark.parametrize("name", list(BATCHES))
def test_logits_and_loss_match_hf(saved, name):
    hf, native, _ = saved
    batch = _inputs(native, name)
    with torch.no_grad():
        ref, out = hf(**batch), native(**batch)
    real = batch["attention_mask"].bool()
    diff = (ref.logits - out.logits)[real].abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e}, loss {out.loss.item():.6f} vs {ref.loss.item():.6f}")
    assert type(native).__name__ == "LlavaModel"
    assert diff < ATOL and abs(ref.loss.item() - out.loss.item()) < ATOL


def test_gradients_match_hf(saved):
    from openspeed.models.llava.convert import native_to_hf

    hf, native, _ = saved
    batch = _inputs(native, "two_images_in_one")
    hf.zero_grad()
    native.zero_grad()
    hf(**batch).loss.backward()
    native(**batch).loss.backward()
    theirs = {k: p.grad for k, p in hf.named_parameters()}
    ours = native_to_hf({k: p.grad for k, p in native.named_parameters()}, native.config)
    assert set(ours) == set(theirs)
    # Parameters whose output feeds nothing (CLIP's post_layernorm, layers after the last selected
    # one) get no gradient in either.
    unused = {k for k, g in theirs.items() if g is None}
    assert unused == {k for k, g in ours.items() if g is None}
    assert any("post_layernorm" in k for k in unused)
    # The floor: a key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by
    # all keys), so both sides hold rounding noise of ~1e-9 there.
    worst = max((ours[k] - theirs[k]).abs().max().item() / max(theirs[k].abs().max().item(), 1e-5)
                for k in ours if k not in unused)
    print(f"worst relative gradient difference over {len(ours) - len(unused)} tensors: {worst:.2e}")
    assert worst < 1e-4


def test_config_round_trips(saved):
    from transformers import LlavaConfig as HFConfig

    _, native, path = saved
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        assert LlavaConfig.from_hf_dict(json.load(fh)) == native.config
    back = HFConfig(**native.config.to_hf_dict())
    assert LlavaConfig.from_hf_dict(back.to_dict()) == native.config


def test_hub_layout_and_tied_embeddings_load(saved, tmp_path):
    """The llava-hf checkpoints' key layout (``vision_tower.vision_model.*``, ``language_model.model.*``,
    ``language_model.lm_head.*``) gives the same model; a tied reference loads without ``lm_head``."""
    from safetensors.torch import save_file

    hf, native, path = saved
    renames = (("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.",
               "multi_modal_projector."), ("model.language_model.", "language_model.model."),
               ("lm_head.", "language_model.lm_head."))
    hub = {}
    for key, value in hf.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        hub[key] = value.contiguous()
    out = tmp_path / "hub"
    out.mkdir()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        (out / "config.json").write_text(fh.read())
    save_file(hub, out / "model.safetensors", metadata={"format": "pt"})
    loaded = openspeed.from_pretrained(str(out))
    for (name, a), (_, b) in zip(loaded.state_dict().items(), native.state_dict().items()):
        assert torch.equal(a, b), name

    tied = random_hf_model(seed=2, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    model = openspeed.from_pretrained(str(tmp_path / "tied"))
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    batch = _inputs(model, "one_image_each")
    with torch.no_grad():
        diff = (tied(**batch).logits - model(**batch).logits)[batch["attention_mask"].bool()].abs().max()
    assert diff < ATOL


def test_flops_equal_counted_flops(saved):
    """Vision tower + projector: analytic = 3 x counted forward FLOPs exactly; the decoder's matmuls
    too (torch counts its causal attention dense)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from openspeed.models.llava.flops import flops_breakdown

    _, native, _ = saved
    batch = make_batch([[("text", 3), "image", ("text", 2), "image", ("answer", 4)]],
                       native.config.vision.tokens_per_image)
    batch.pop("labels")
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        native(**batch)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    seq = batch["input_ids"].shape[1]
    parts = flops_breakdown(native.config, seq - 2 * native.config.vision.tokens_per_image, 2)
    vision = counts["LlavaModel.visual"]
    assert 3 * vision == parts["vision_matmul"] + parts["vision_attention"] + parts["projector_matmul"]
    text = native.config.text
    dense_attention = 4 * seq * seq * text.num_attention_heads * text.head_dim * text.num_hidden_layers
    decoder = counts["LlavaModel.language_model"] + counts["LlavaModel.lm_head"]
    assert 3 * (decoder - dense_attention) == parts["llm_matmul"]
    assert counts["Global"] == vision + decoder


def test_hf_generate_matches(saved):
    """Greedy decoding with the KV cache equals transformers' ``generate`` on a left-padded batch."""
    from openspeed.inference import greedy_generate

    hf, native, _ = saved
    batch = left_pad(make_batch([[("text", 5), "image", ("text", 4)], [("text", 2), "image", ("text", 2), "image",
                                                                        ("text", 3)], [("text", 7)]],
                                native.config.vision.tokens_per_image, seed=5), PAD_ID)
    batch.pop("labels")
    never = 199
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=never, pad_token_id=PAD_ID)
    assert greedy_generate(native, batch, 6, never, PAD_ID) == out[:, batch["input_ids"].shape[1]:].tolist()


def test_freezing_each_part(saved):
    from openspeed.models.registry import get_model_spec

    _, native, _ = saved
    spec = get_model_spec("llava")
    check_freezing(lambda: spec.build(native.config), spec, ("vision", "projector", "llm"))
    assert spec.part_of("visual.multi_modal_projector.linear_1.weight") == "projector"


# --------------------------------------------------------------------------------------------------
# Through the CLI, on the shapes set with a LLaVA model directory
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_set("llava", str(tmp_path_factory.mktemp("llava_shapes")))


@pytest.mark.parametrize("kind", ["LlavaImageProcessor", "CLIPImageProcessor"])
def test_image_processors_equal_transformers(shapes, tmp_path, kind):
    """Both processors a LLaVA directory may name give transformers' pixels on images of several aspect
    ratios (LLaVA-1.5's pads to a square with the mean colour first); ``<image>`` expands to the
    tower's feature count."""
    import shutil

    import numpy as np
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from openspeed.data.conversation import ConversationDataset
    from openspeed.data.processor import ImageTokenProcessor, VLProcessor

    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(shapes, "model"), model_dir)
    settings_path = os.path.join(model_dir, "preprocessor_config.json")
    with open(settings_path, encoding="utf-8") as fh:
        settings = json.load(fh)
    settings["image_processor_type"] = kind
    if kind == "CLIPImageProcessor":
        settings.pop("do_pad")
    with open(settings_path, "w", encoding="utf-8") as fh:
        json.dump(settings, fh)
    processor = VLProcessor.from_pretrained(model_dir)
    assert isinstance(processor, ImageTokenProcessor)
    reference = (LlavaImageProcessorPil if kind == "LlavaImageProcessor" else CLIPImageProcessorPil)(
        **{k: v for k, v in settings.items() if k != "image_processor_type"})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              ((112, 112), (60, 150), (200, 90), (33, 47))]
    pixels, grids = processor.process_images(images)
    ref = reference(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, ref.flatten(1)) and grids.tolist() == [[1, 1, 1]] * 4
    if kind == "LlavaImageProcessor":  # the padding is real: it changes a non-square image's pixels
        crop_only = CLIPImageProcessorPil(**{k: v for k, v in settings.items() if k not in ("image_processor_type",
                                                                                           "do_pad")})
        assert not torch.equal(ref[1], crop_only(images[1:2], return_tensors="pt")["pixel_values"][0])
    sample = ConversationDataset(os.path.join(shapes, "train.jsonl"), processor, max_seq_len=256)[0]
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == processor.tokens_per_image == 64


@pytest.fixture(scope="module")
def mixed_run(shapes, tmp_path_factory):
    """(config, run dir, curve): one process, 5 fp32 steps over mixed text-only / image batches."""
    return mixed_reference(shapes, str(tmp_path_factory.mktemp("llava_mixed")), images_only=True)


LAYOUTS = {
    "dp_shard2": "parallel.dp_shard=2",
    "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "pp2": "parallel.pp=2",
    "cp2_ring_selective_recompute": "parallel.cp=2 parallel.cp_algo=ring memory.recompute=selective",
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_layouts_match_one_process(layout, mixed_run, tmp_path):
    config, _, reference = mixed_run
    check_layout(config, reference, layout, str(tmp_path / "run"))


def _to_hf(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"].view(-1, 3, 112, 112)}


def test_hf_export_loads_in_transformers(mixed_run, shapes, tmp_path):
    from transformers import LlavaForConditionalGeneration

    check_hf_export(mixed_run[1], shapes, str(tmp_path / "hf"), LlavaForConditionalGeneration, _to_hf)


def test_eval_and_chat_on_the_run(mixed_run, shapes, tmp_path):
    check_eval_and_chat(mixed_run[1], shapes, str(tmp_path / "eval"))


def test_lora_adapter_loads_in_peft(shapes, tmp_path):
    from transformers import LlavaForConditionalGeneration

    check_lora_peft(shapes, str(tmp_path), LlavaForConditionalGeneration,
                    ("model.vision_tower.encoder.layers.0.self_attn.out_proj",
                     "model.language_model.layers.0.self_attn.q_proj"), _to_hf)
