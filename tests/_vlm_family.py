"""What every VLM family's tests check through the CLI on the shapes set, parametrised by family:
the mixed-data reference run and layouts against it, the transformers export, eval and chat, and a
LoRA run's peft adapter over the transformers base."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from _mixed import write_mixed_set
from _train_utils import assert_curves_close, make_tiny_run_config, run_train, train_curve, write_base_model

from openspeed.cli import main

ATOL = 1e-4
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}
BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def shapes_set(family: str, out: str, num: int = 48) -> str:
    """``openspeed data shapes --family FAMILY``: the set and a tiny model directory of that family."""
    assert main(["data", "shapes", "--family", family, "--out", out, "--num", str(num)]) == 0
    with open(os.path.join(out, "model", "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["model_type"] == family
    return out


def mixed_reference(shapes: str, root: str, images_only: bool = False) -> tuple[str, str, dict]:
    """(config, run dir, curve): one process, 5 fp32 steps over mixed text / image (/ video) batches,
    with a final checkpoint."""
    config = write_mixed_set(shapes, root, images_only=images_only)
    run_dir = os.path.join(root, "one")
    result = run_train(config, "train.run_dir=" + run_dir, "checkpoint.save_final=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped samples: 0" in result.stderr
    return config, run_dir, train_curve(run_dir)


def check_layout(config: str, reference: dict, layout: str, run_dir: str) -> None:
    """Two processes under ``layout`` train the reference's 5 steps to its losses and gradient norms."""
    result = run_train(config, "--nproc", "2", *layout.split(), "train.run_dir=" + run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(run_dir), reference)
    assert reference[5][0] < reference[1][0]


def shapes_batch(shapes: str, n: int = 3) -> dict:
    """``n`` training samples of the set, collated (the inputs models are compared on)."""
    from openspeed.data.collator import VLCollator
    from openspeed.data.conversation import ConversationDataset
    from openspeed.data.processor import VLProcessor

    processor = VLProcessor.from_pretrained(os.path.join(shapes, "model"))
    dataset = ConversationDataset(os.path.join(shapes, "train.jsonl"), processor, max_seq_len=256)
    full = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)(
        [dataset[i] for i in range(n)]
    )
    return {k: full[k] for k in BATCH_KEYS}


def real_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def check_hf_export(run_dir: str, shapes: str, out: str, hf_class, to_hf: Callable[[dict], dict]) -> None:
    """``convert --to hf`` loads in transformers (no missing / unexpected key) with the run's logits."""
    from openspeed.training.run_loading import load_trained

    assert main(["convert", run_dir, "--to", "hf", "--out", out]) == 0
    hf, info = hf_class.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = shapes_batch(shapes)
    diff = (real_logits(hf.eval(), to_hf(batch)) - real_logits(load_trained(run_dir).model, batch)).abs().max()
    print(f"convert --to hf: max |logit diff| vs the native run {diff:.2e}")
    assert diff < ATOL


def check_eval_and_chat(run_dir: str, shapes: str, out: str) -> None:
    """``openspeed eval`` scores the held-out rows; ``chat``'s answer is the run's greedy decoding."""
    from openspeed.data.collator import VLCollator
    from openspeed.data.processor import VLProcessor
    from openspeed.inference.chat import answer_one
    from openspeed.inference.generate import build_prompt_sample, greedy_generate
    from openspeed.training.run_loading import load_trained

    assert main(["eval", "--checkpoint", run_dir, "--data", os.path.join(shapes, "eval.tsv"), "--out", out,
                 "--max-new-tokens", "4"]) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
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


def check_lora_peft(shapes: str, tmp: str, hf_class, targets: tuple[str, ...], to_hf: Callable[[dict], dict]) -> None:
    """A LoRA run over a base with weights: its ``convert --to peft`` adapter, loaded by peft over the
    transformers base, gives the native LoRA model's logits; ``targets`` are in the adapter's list."""
    from peft import PeftModel

    from openspeed.training.run_loading import load_lora_run

    base = write_base_model(shapes, os.path.join(tmp, "base"))
    config = make_tiny_run_config(
        tmp, shapes, model={"path": base, "rope_theta": None, "lora": dict(LORA)},
        optim={"lr": 2e-2, "warmup_steps": 1}, data={"val_path": ""},
        train={"micro_batch_size": 2, "global_batch_size": 4}, checkpoint={"interval": 0, "save_final": True},
    )
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(tmp, "run")
    curve = train_curve(run_dir)
    assert curve[5][0] < curve[1][0]

    peft_dir = os.path.join(tmp, "peft")
    assert main(["convert", run_dir, "--to", "peft", "--out", peft_dir]) == 0
    with open(os.path.join(peft_dir, "adapter_config.json"), encoding="utf-8") as fh:
        adapted = json.load(fh)["target_modules"]
    assert all(t in adapted for t in targets), (targets, adapted)
    batch = shapes_batch(shapes)
    hf_base = hf_class.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = real_logits(hf_base, to_hf(batch))
    peft_model = PeftModel.from_pretrained(hf_base, peft_dir).eval()
    ours = real_logits(load_lora_run(run_dir).model, batch)
    moved = (ours - base_logits).abs().max().item()
    diff = (ours - real_logits(peft_model, to_hf(batch))).abs().max().item()
    print(f"LoRA vs base: {moved:.3e}; peft over transformers vs native LoRA: {diff:.3e}")
    assert moved > 1e-3
    assert diff < ATOL


def left_pad(batch: dict, pad_id: int) -> dict:
    """The right-padded ``batch`` with every row's real tokens moved to the right end."""
    mask = batch["attention_mask"]
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        if key not in batch:
            continue
        rows = []
        for row, m in zip(batch[key], mask):
            n = int(m.sum())
            fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
            rows.append(torch.cat([torch.full((len(row) - n,), fill, dtype=row.dtype), row[:n]]))
        out[key] = torch.stack(rows)
    return out


def check_freezing(model_factory: Callable[[], torch.nn.Module], spec, parts: tuple[str, ...]) -> None:
    """Every parameter maps to one of ``parts``; freezing a part turns off exactly its gradients."""
    from openspeed.training.model_setup import apply_freeze

    names = [n for n, _ in model_factory().named_parameters()]
    assert {spec.part_of(n) for n in names} == set(parts)
    for part in parts:
        model = model_factory()
        apply_freeze(model, spec, [part])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {n for n in names if spec.part_of(n) == part} and frozen
