"""`openspeed chat` and `openspeed convert` on a (briefly) trained run."""

import json
import os
import subprocess
import sys

import pytest
from _train_utils import ROOT, make_tiny_run_config, run_train


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openspeed", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("chatrun"))
    config = make_tiny_run_config(tmp, shapes_dir, train={"max_steps": 3}, checkpoint={"save_final": True})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-2000:]
    return os.path.join(tmp, "run")


def _first_val_record(shapes_dir):
    with open(os.path.join(shapes_dir, "val.jsonl"), encoding="utf-8") as fh:
        return json.loads(fh.readline())


def _reference_answer(run_dir, question, image):
    from openspeed.data.collator import VLCollator
    from openspeed.inference.generate import build_prompt_sample, greedy_generate
    from openspeed.training.run_loading import load_trained_model

    model, processor, _, step = load_trained_model(run_dir)
    assert step == 3
    sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + question}], [image])
    batch = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)([sample])
    tokens = greedy_generate(model, batch, 32, processor.eos_token_id, processor.pad_token_id)[0]
    return processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_chat_answers_one_question(trained_run, shapes_dir):
    record = _first_val_record(shapes_dir)
    image = os.path.join(shapes_dir, record["images"][0])
    question = record["messages"][0]["content"].replace("<image>", "")
    result = _cli("chat", "--checkpoint", trained_run, "--image", image, question)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == _reference_answer(trained_run, question, image)


def test_chat_answers_a_questions_file(trained_run, shapes_dir, tmp_path):
    record = _first_val_record(shapes_dir)
    image = os.path.join(shapes_dir, record["images"][0])
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join([
        json.dumps({"image": image, "question": "How many shapes are there?"}),
        "{not json",
        json.dumps({"image": str(tmp_path / "missing.png"), "question": "What colour?"}),
        json.dumps({**record, "images": [image]}),  # a conversation: its reference answer is dropped
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    result = _cli("chat", "--checkpoint", trained_run, "--questions", str(questions), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    assert [("prediction" in r, "error" in r) for r in rows] == [(True, False), (False, True), (False, True),
                                                                   (True, False)]
    assert rows[0]["prediction"] == _reference_answer(trained_run, "How many shapes are there?", image)
    assert "answered 2 questions (2 skipped)" in result.stderr


def test_convert_to_hf_loads_in_transformers(trained_run, tmp_path):
    out = tmp_path / "hf"
    result = _cli("convert", trained_run, "--to", "hf", "--out", str(out), "--max-shard-size", "200KB")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    import transformers

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
    assert model.config.text_config.rope_parameters["rope_theta"] == 10.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["chat", "--checkpoint", "no/such/run", "hi"], "no/such/run"),
        (["chat", "--checkpoint", ".", "--image", "no/such.png", "hi"], "no/such.png"),
        (["convert", "no/such/run", "--to", "hf", "--out", "x"], "no/such/run"),
        (["convert", ".", "--to", "onnx", "--out", "x"], "--to"),
    ],
)
def test_chat_convert_user_errors_are_one_line(args, needle):
    result = _cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_training_starts_from_exported_weights_in_any_layout(trained_run, shapes_dir, tmp_path):
    from _train_utils import train_curve, train_losses

    hf_dir = tmp_path / "hf"
    assert _cli("convert", trained_run, "--to", "hf", "--out", str(hf_dir)).returncode == 0
    runs = {}
    for name, extra in (("one", []), ("fsdp", ["--nproc", "2", "parallel.dp_shard=2"])):
        os.makedirs(tmp_path / name)
        config = make_tiny_run_config(str(tmp_path / name), shapes_dir, train={"max_steps": 2},
                                      model={"path": str(hf_dir), "init_std": None, "rope_theta": None})
        result = run_train(config, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "has no weights" not in result.stderr
        runs[name] = train_curve(str(tmp_path / name / "run"))
    for step in (1, 2):  # loss and gradient norm
        assert runs["one"][step] == pytest.approx(runs["fsdp"][step], rel=1e-4)
    # Same first batch as the run the weights came from, but 3 steps further trained: lower loss.
    assert runs["one"][1][0] < train_losses(trained_run)[1]

    # A checkpoint with a weight the model does not have is refused with one line.
    import json

    from safetensors.torch import load_file, save_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text()) \
        if (hf_dir / "model.safetensors.index.json").exists() else None
    assert index is None  # small model: one file
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.language_model.extra.weight"] = tensors["lm_head.weight"][:2].clone()
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(tmp_path / "extra")
    result = run_train(make_tiny_run_config(str(tmp_path / "extra"), shapes_dir, model={"path": str(hf_dir)}))
    assert result.returncode == 2
    assert "unexpected weights language_model.extra.weight" in result.stderr.strip().splitlines()[-1]
