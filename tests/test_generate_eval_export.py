"""Greedy generation, VQA scoring/evaluation, run loading, HF export and loss plots.

Everything runs on a tiny random-init native model over the synthetic shapes set: no training.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from openspeed.config import RunConfig, dump_yaml
from openspeed.data.collator import VLCollator
from openspeed.data.conversation import ConversationDataset
from openspeed.data.processor import VLProcessor
from openspeed.data.shapes import make_shapes_dataset
from openspeed.errors import BadSampleError, CheckpointError, DataError
from openspeed.eval import chance_accuracy, evaluate_vqa, normalize_answer, score_predictions
from openspeed.inference import build_prompt_sample, greedy_generate
from openspeed.models.init import init_weights
from openspeed.training.export import export_hf
from openspeed.training.model_setup import model_config_from_run
from openspeed.training.plotting import plot_losses
from openspeed.training.run_loading import load_trained_model

ROPE_THETA = 10.0
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shapes data, its processor and dataset, and a random-init native model (rope_theta override)."""
    root = tmp_path_factory.mktemp("gen_eval")
    info = make_shapes_dataset(root / "shapes", num=24)
    processor = VLProcessor.from_pretrained(info["model_dir"])
    dataset = ConversationDataset(info["train"], processor, max_seq_len=256)
    cfg = RunConfig()
    cfg.model.path = str(info["model_dir"])
    cfg.model.rope_theta = ROPE_THETA
    spec, config = model_config_from_run(cfg)
    model = spec.build(config)
    init_weights(model, seed=5, std=0.1)
    spec.reset_buffers(model)
    return {"root": root, "info": info, "processor": processor, "dataset": dataset, "cfg": cfg,
            "model": model.eval()}


def _collate(processor, samples, **kwargs):
    return VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id, **kwargs)(
        samples
    )


def _reference_generate(model, processor, sample, max_new_tokens, eos):
    """One sample at a time, no padding, the whole sequence re-run each step."""
    batch = _collate(processor, [sample])
    ids = batch["input_ids"]
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids, **vision).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _prompt_samples(env):
    """Prompts of different lengths: one image, one image + long text, text only, two images."""
    processor, dataset = env["processor"], env["dataset"]
    rec = [dataset.record(i) for i in range(3)]

    def image(record):
        return os.path.join(env["info"]["root"], record["images"][0])

    return [
        build_prompt_sample(processor, rec[0]["messages"][:1], [image(rec[0])]),
        build_prompt_sample(
            processor,
            [{"role": "user", "content": rec[1]["messages"][0]["content"] + " Answer in one word, please."}],
            [image(rec[1])],
        ),
        build_prompt_sample(processor, [{"role": "user", "content": "How many shapes are there?"}], []),
        build_prompt_sample(
            processor,
            [{"role": "user", "content": "<image>and<image>" + rec[2]["messages"][0]["content"][7:]}],
            [image(rec[2]), image(rec[0])],
        ),
    ]


def test_prompt_sample_is_the_training_prefix(env):
    processor, dataset = env["processor"], env["dataset"]
    record = dataset.record(0)
    train = dataset[0]
    image = os.path.join(env["info"]["root"], record["images"][0])
    prompt = build_prompt_sample(processor, record["messages"][:1], [image])
    n = prompt["input_ids"].numel()
    assert torch.equal(prompt["input_ids"], train["input_ids"][:n])
    assert (prompt["labels"] == -100).all()
    assert processor.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    # The answer is the very next thing in the training sample, and the first labelled token.
    assert int((train["labels"] != -100).nonzero()[0]) == n
    assert torch.equal(prompt["pixel_values"], train["pixel_values"])
    with pytest.raises(BadSampleError):  # tag/image count mismatch
        build_prompt_sample(processor, record["messages"][:1], [])
    with pytest.raises(BadSampleError):  # a prompt must end with the user's turn
        build_prompt_sample(processor, record["messages"], [image])


def test_greedy_generate_matches_unpadded_reference(env):
    model, processor = env["model"], env["processor"]
    samples = _prompt_samples(env)
    lengths = [s["input_ids"].numel() for s in samples]
    assert len(set(lengths)) == len(lengths)  # every row is padded differently
    batch = _collate(processor, samples, pad_to_multiple_of=16)
    max_new = 4

    # Pick an EOS the model really produces (row 0's second token), so stopping is exercised.
    free_run = [_reference_generate(model, processor, s, max_new, eos=-1) for s in samples]
    eos = free_run[0][1]
    expected = [_reference_generate(model, processor, s, max_new, eos=eos) for s in samples]
    assert len(expected[0]) < max_new and eos not in sum(expected, [])

    model.train()
    got = greedy_generate(model, batch, max_new, eos_token_id=eos, pad_token_id=processor.pad_token_id)
    assert got == expected
    assert model.training  # the caller's mode is restored

    # early_stop=False (what distributed callers pass) gives the same tokens.
    model.eval()
    kept = greedy_generate(model, batch, max_new, eos, processor.pad_token_id, early_stop=False)
    assert kept == expected
    assert greedy_generate(model, batch, 0, eos, processor.pad_token_id) == [[] for _ in samples]


class _CountingModel(torch.nn.Module):
    """Predicts ``input token + 1`` everywhere, or always ``stop_id`` when set; counts its forwards."""

    def __init__(self, vocab: int, stop_id: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.stop_id, self.calls = vocab, stop_id, 0

    def forward(self, input_ids, attention_mask=None, **_):
        self.calls += 1
        target = input_ids + 1 if self.stop_id is None else torch.full_like(input_ids, self.stop_id)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, self.vocab).float()})()


def test_greedy_generate_appends_after_each_rows_last_token_and_early_stop():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0, 0, 0], [10, 11, 12, 13, 0], [3, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]),
    }
    counting = _CountingModel(vocab=32)
    # Row 1 reaches the EOS id 15 after one token; the others run to max_new_tokens.
    assert greedy_generate(counting, batch, 3, eos_token_id=15, pad_token_id=0) == [[7, 8, 9], [14], [4, 5, 6]]
    assert counting.calls == 3

    stopping = _CountingModel(vocab=32, stop_id=2)
    assert greedy_generate(stopping, batch, 4, eos_token_id=2, pad_token_id=0) == [[], [], []]
    assert stopping.calls == 1  # every row is done after the first step
    stopping.calls = 0
    # Distributed callers keep every rank in step: always exactly max_new_tokens forwards.
    assert greedy_generate(stopping, batch, 4, eos_token_id=2, pad_token_id=0, early_stop=False) == [[], [], []]
    assert stopping.calls == 4
    # Left padding is decoded too (tests/test_generation.py); padding on both sides is refused.
    both_sides = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="left or right padding only"):
        greedy_generate(counting, {**batch, "attention_mask": both_sides}, 2, 15, 0)


def test_score_predictions_and_chance():
    predictions = ["Red.", "the  Circle", "bottom-left", "blue", "xx#!", "Two"]
    answers = ["red", "circle", "bottom left", "green", "square", "two"]
    qtypes = ["colour", "shape", "position", "colour", "shape", "count"]
    assert normalize_answer("  The Top-Left, please! ") == "top left please"
    assert normalize_answer("An apple") == "apple"
    scores = score_predictions(predictions, answers, qtypes)
    assert scores["n"] == 6 and scores["correct"] == 4
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["per_type"] == {"colour": 0.5, "count": 1.0, "position": 1.0, "shape": 0.5}
    assert scores["per_type_n"] == {"colour": 2, "count": 1, "position": 1, "shape": 2}
    assert score_predictions([], [], [])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        score_predictions(["a"], [], [])

    # colour: red x2 of 3 -> 2; shape: "circle"/"The circle." of 3 -> 2; count: 1 -> 1. 5 / 7.
    answers = ["red", "Red", "blue", "circle", "The circle.", "square", "two"]
    qtypes = ["colour"] * 3 + ["shape"] * 3 + ["count"]
    assert chance_accuracy(answers, qtypes) == pytest.approx(5 / 7)
    assert chance_accuracy([], []) == 0.0


def test_evaluate_vqa_counts_and_skips(env, tmp_path):
    processor, model = env["processor"], env["model"]
    root = env["info"]["root"]
    with open(env["info"]["train"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh][:4]
    broken = dict(records[0], images=["images/does_not_exist.png"])
    data = tmp_path / "eval.jsonl"
    lines = [json.dumps(r) for r in records] + [json.dumps(broken), "{not json"]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = ConversationDataset(data, processor, max_seq_len=256, media_root=root)

    result = evaluate_vqa(model, processor, dataset, range(len(dataset)), batch_size=3, max_new_tokens=3)
    assert result["n"] == 4 and result["indices"] == [0, 1, 2, 3]
    assert result["skipped"] == 2
    assert result["skipped_reasons"] == {"missing_file": 1, "malformed_record": 1}
    assert result["answers"] == [r["answer"] for r in records]
    assert result["qtypes"] == [r["qtype"] for r in records]
    assert len(result["predictions"]) == 4 and all(isinstance(p, str) for p in result["predictions"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["chance_accuracy"] > 0

    # Predictions are the greedy answers, whatever the batch size.
    single = evaluate_vqa(model, processor, dataset, [0, 1, 2, 3], batch_size=1, max_new_tokens=3)
    assert single["predictions"] == result["predictions"]
    blank = evaluate_vqa(model, processor, dataset, [0, 1, 4], batch_size=2, blank_images=True,
                         max_new_tokens=3)
    assert blank["n"] == 2 and blank["skipped"] == 1


def _fake_run(env, run_dir, model_path, checkpoint_model=None):
    """A run dir with config.yaml and, when a model is given, a DCP checkpoint at step 1."""
    cfg = RunConfig()
    cfg.model.path = str(model_path)
    cfg.model.rope_theta = ROPE_THETA
    cfg.train.run_dir = str(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
    if checkpoint_model is None:
        return None
    step_dir = os.path.join(run_dir, "checkpoints", "step_1")
    # Single process, no process group: DCP writes the same format the trainer's ranks write.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": checkpoint_model.state_dict()}, checkpoint_id=step_dir, no_dist=True)
    with open(os.path.join(step_dir, "train_state.json"), "w", encoding="utf-8") as fh:
        json.dump({"step": 1}, fh)
    return step_dir


def _image_batch(env):
    dataset = env["dataset"]
    samples = [dataset[i] for i in range(3)]
    assert len({s["input_ids"].numel() for s in samples}) > 1  # padding present
    batch = _collate(env["processor"], samples)
    return {k: batch[k] for k in MODEL_INPUTS}


def _max_diff_on_real_tokens(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def test_export_and_load_round_trip(env, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = env["model"]
    run_dir = tmp_path / "run"
    step_dir = _fake_run(env, run_dir, env["cfg"].model.path, checkpoint_model=model)
    os.makedirs(run_dir / "checkpoints" / "step_2.incomplete")  # an unfinished save is never picked
    batch = _image_batch(env)
    with torch.no_grad():
        ref = model(**batch).logits

    out = export_hf(str(run_dir), tmp_path / "export", max_shard_size_bytes=200_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["text_config"]["rope_parameters"]["rope_theta"] == ROPE_THETA

    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    with torch.no_grad():
        hf_logits = hf.eval()(**batch).logits
    diff = _max_diff_on_real_tokens(hf_logits, ref, batch["attention_mask"])
    print(f"max |HF - native| logit diff: {diff:.2e}")
    assert diff < 1e-4

    # The run dir and its checkpoint dir load the same weights, unsharded, in eval mode.
    for where in (str(run_dir), step_dir):
        loaded, processor, run_cfg, step = load_trained_model(where)
        assert step == 1 and not loaded.training and run_cfg.model.rope_theta == ROPE_THETA
        assert processor.eos_token_id == env["processor"].eos_token_id
        with torch.no_grad():
            assert torch.allclose(loaded(**batch).logits, ref, atol=1e-5)

    # No checkpoint but a model dir with weights (the export): those weights are used.
    _fake_run(env, tmp_path / "fresh", out)
    loaded, _, _, step = load_trained_model(str(tmp_path / "fresh"))
    assert step == 0
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ref, atol=1e-5)


def test_load_errors_name_the_path(env, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        load_trained_model(str(missing))
    _fake_run(env, tmp_path / "empty", env["cfg"].model.path)  # weightless model dir, no checkpoint
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_trained_model(str(tmp_path / "empty"))
    partial = tmp_path / "empty" / "checkpoints" / "step_3.incomplete"
    partial.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_trained_model(str(partial))


def test_plot_losses_writes_png(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = [json.dumps({"step": s, "loss": 3.0 / s + 0.1 * (s % 3), "lr": 1e-3}) for s in range(1, 41)]
    lines += [json.dumps({"step": s, "val_loss": 2.0 / s, "val_accuracy": 0.5}) for s in (10, 20, 40)]
    lines.append('{"step": 41, "loss": ')  # a line cut off by a crash
    metrics.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = plot_losses(str(metrics), str(tmp_path / "plots" / "loss.png"))
    data = open(out, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    with pytest.raises(DataError):
        plot_losses(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png"))
