"""``--device`` of chat, eval, generate and convert, and decoding that stays on the device.

On every machine: a device it lacks is one ``error:`` line (exit status 2) from each command, before
any model is loaded; ``--device cpu`` answers, scores, samples and exports what the CPU code path
computes (references: greedy decoding by the full forward, one prompt at a time; the export and the
sampling called directly); the KV-cache decode loop reads back at most two values per generated
token whatever the number of layers (counted by the code that makes each read, as
``tests/test_host_syncs.py`` does for training). With an accelerator (``gpu`` tests, deselected where
the accelerator is the CPU): every command on it gives the CPU's tokens, files and (within rounding)
clips, and the KV cache lives on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _qwen_tiny import PAD_ID, make_batch, native_config
from _runs import plain_process, untrained_run_dir  # noqa: F401 - plain_process: autouse

from openspeed import cli
from openspeed.commands import ERROR_FILE_ENV, EXIT_USER_ERROR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "How many shapes are there?"
MAX_NEW = 6


def _accelerator() -> str:
    from openspeed.accelerator import get_accelerator

    return get_accelerator().device_type


def _missing_device() -> str:
    """A device this machine lacks: ``cuda``, or on a CUDA machine a device number it does not have."""
    return "cuda" if _accelerator() != "cuda" else "cuda:4096"


def _main(capsys, *argv) -> tuple[int, str, list[str]]:
    """``openspeed ARGV`` in this process: (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    """(shapes set info, run dir): the shapes set's tiny model at random weights as a step-1 checkpoint."""
    return untrained_run_dir(tmp_path_factory.mktemp("device_vlm"), num=40)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """A Wan run directory over a tiny random pipeline, without checkpoints (the pipeline's DiT weights)."""
    from openspeed.models.wan.moving_shapes import vocabulary
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("device_wan")
    pipeline = write_tiny_wan_pipeline(root / "pipe", words=vocabulary(), seed=4)
    (root / "train.jsonl").write_text('{"video": "clip.mp4", "caption": "a red square moves right"}\n')
    cfg = {"model": {"path": str(pipeline)},
           "data": {"train_path": str(root / "train.jsonl"), "video_buckets": ["5x16x16"], "text_len": 8},
           "train": {"run_dir": str(root / "run")}}
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run"


def _image(info) -> str:
    record = json.loads(Path(info["val"]).read_text().splitlines()[0])
    return str(Path(info["root"]) / record["images"][0])


@torch.no_grad()
def _full_forward_answer(model, processor, question: str, image, max_new: int) -> str:
    """Greedy decoding of one unpadded prompt (``image``: a path or a PIL image) by the full forward
    on the growing sequence."""
    from openspeed.inference.generate import build_prompt_sample

    sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + question}], [image])
    device = next(model.parameters()).device
    ids = sample["input_ids"][None].to(device)
    vision = {k: sample[k].to(device) for k in ("pixel_values", "image_grid_thw")}
    image_id = processor.image_token_id
    out = []
    for _ in range(max_new):
        types = (ids == image_id).int()
        token = int(model(input_ids=ids, mm_token_type_ids=types, **vision).logits[0, -1].float().argmax())
        if token == processor.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return processor.tokenizer.decode(out, skip_special_tokens=True).strip()


def _argv(command: str, tmp: Path, info=None, run=None) -> list:
    """The command line of ``command`` on ``run`` (a plain folder when ``None``: the device is checked
    before the run is read)."""
    run = run or tmp
    if command == "chat":
        return ["chat", "--checkpoint", run, "--max-new-tokens", MAX_NEW, QUESTION]
    if command == "eval":
        data = info["eval_tsv"] if info else tmp / "data.tsv"
        if not info:
            data.write_text("index\tquestion\tanswer\timage\n")
        return ["eval", "--checkpoint", run, "--data", data, "--out", tmp / "eval", "--max-new-tokens", MAX_NEW]
    if command == "generate":
        return ["generate", "--checkpoint", run, "--prompt", "a red square moves right", "--out",
                tmp / "clip.mp4", "--steps", 2]
    if command == "generate --nproc 2":
        return [*_argv("generate", tmp, info, run), "--nproc", 2]
    assert command == "convert"
    return ["convert", run, "--to", "hf", "--out", tmp / "export"]


# ----------------------------------------------------------------------------- user errors

COMMANDS = ["chat", "eval", "generate", "generate --nproc 2", "convert"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_device_is_one_line_before_any_work(capsys, tmp_path, command):
    missing = _missing_device()
    code, out, err = _main(capsys, *_argv(command, tmp_path), "--device", missing)
    assert code == EXIT_USER_ERROR and out == ""
    assert len(err) == 1 and re.fullmatch(
        rf"error: --device {missing}: torch \S+ finds (no cuda device|\d+ cuda devices?)", err[0]), err
    assert not (tmp_path / "export").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("command", ["chat", "eval", "generate", "convert"])
def test_a_bad_device_string_is_one_line(capsys, tmp_path, command):
    code, _, err = _main(capsys, *_argv(command, tmp_path), "--device", "gpu")
    assert (code, err) == (EXIT_USER_ERROR, ["error: --device: expected auto, cpu, cuda[:N] or npu[:N], got 'gpu'"])


def test_a_missing_device_through_the_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop(ERROR_FILE_ENV, None)
    env.pop("OPENSPEED_DEVICE", None)
    missing = _missing_device()
    result = subprocess.run([sys.executable, "-m", "openspeed", "chat", "--checkpoint", str(tmp_path), "--device",
                             missing, QUESTION], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {missing}: torch "), result.stderr


def test_several_processes_take_the_accelerator_type_only(capsys, tmp_path):
    other = "npu" if _accelerator() == "cpu" else "cpu"
    code, _, err = _main(capsys, *_argv("generate --nproc 2", tmp_path), "--device", other)
    assert code == EXIT_USER_ERROR and len(err) == 1, err
    if other == "cpu":  # npu on a CPU machine is refused by the device check itself
        assert err[0].startswith(f"error: --device cpu: 2 processes each use their own {_accelerator()} device")


# ----------------------------------------------------------------------------- --device cpu


def test_chat_on_the_cpu_answers_as_the_full_forward(capsys, vlm_run, tmp_path):
    from openspeed.training.run_loading import load_trained_model

    info, run = vlm_run
    image = _image(info)
    model, processor, _, _ = load_trained_model(str(run), "cpu")
    expected = _full_forward_answer(model, processor, QUESTION, image, MAX_NEW)
    code, out, err = _main(capsys, "chat", "--checkpoint", run, "--image", image, "--max-new-tokens", MAX_NEW,
                           "--device", "cpu", QUESTION)
    assert code == 0, err
    assert out.strip() == expected and expected


def test_eval_on_the_cpu_scores_what_each_prompt_alone_answers(capsys, vlm_run, tmp_path):
    from openspeed.eval.tsv import build_prompt, load_row_image, read_tsv
    from openspeed.training.run_loading import load_trained_model

    info, run = vlm_run
    code, _, err = _main(capsys, *_argv("eval", tmp_path, info, run), "--device", "cpu", "--batch-size", 3)
    assert code == 0, err
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    model, processor, _, _ = load_trained_model(str(run), "cpu")
    rows = read_tsv(info["eval_tsv"]).rows
    assert len(predictions) == len(rows) >= 3
    for row, prediction in zip(rows, predictions, strict=True):
        expected = _full_forward_answer(model, processor, build_prompt(row), load_row_image(row), MAX_NEW)
        assert prediction["prediction"] == expected


def test_convert_on_the_cpu_writes_the_default_export(capsys, vlm_run, tmp_path):
    from openspeed.training.export import export_hf

    _, run = vlm_run
    code, _, err = _main(capsys, "convert", run, "--to", "hf", "--out", tmp_path / "cpu", "--device", "cpu")
    assert code == 0, err
    export_hf(str(run), tmp_path / "direct")
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cpu").iterdir()) and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name


def test_generate_on_the_cpu_samples_what_the_cpu_sampler_does(capsys, wan_run, tmp_path):
    from openspeed.data.video_text import video_to_uint8
    from openspeed.models.wan.generate import generate_videos, load_trained_dit, save_clip

    code, _, err = _main(capsys, *_argv("generate", tmp_path, run=wan_run), "--device", "cpu")
    assert code == 0, err
    trained = load_trained_dit(str(wan_run), "cpu")
    assert next(trained.model.parameters()).device.type == "cpu"
    video = generate_videos(trained, ["a red square moves right"], steps=2)[0]
    reference = save_clip(video, tmp_path / "reference.mp4")
    assert (tmp_path / "clip.png").read_bytes() == Path(reference["frames"]).read_bytes()
    assert video_to_uint8(video).std() > 0  # a clip, not a blank


# ----------------------------------------------------------------------------- host reads per token

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _count_reads(run) -> int:
    """Host reads of tensors (and host tensors made) by ``openspeed/`` code while ``run()`` runs."""
    package = os.sep + "openspeed" + os.sep
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    originals_factory = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}

    def counting(original):
        def wrapper(*args, **kwargs):
            nonlocal count
            if package in sys._getframe(1).f_code.co_filename:
                count += 1
            return original(*args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        for name, original in originals_factory.items():
            setattr(torch, name, counting(original))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in originals_factory.items():
            setattr(torch, name, original)
    return count


@pytest.mark.parametrize("early_stop", [True, False])
def test_cached_decoding_reads_back_per_token_not_per_layer(early_stop):
    from openspeed.inference import generate
    from openspeed.models.init import init_weights
    from openspeed.models.qwen2_5_vl import Qwen2_5_VLModel

    batch = make_batch([[("text", 5), ("image", [1, 4, 4]), ("text", 3)], [("text", 4)]], seed=1)
    batch.pop("labels")
    base = native_config()

    def reads(layers: int, tokens: int) -> int:
        config = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=layers))
        model = Qwen2_5_VLModel(config)
        init_weights(model, seed=3, std=0.2)
        out = []
        # eos -1: no row stops, so every call decodes exactly ``tokens`` tokens.
        count = _count_reads(lambda: out.extend(generate(model.eval(), batch, max_new_tokens=tokens,
                                                         eos_token_id=-1, pad_token_id=PAD_ID,
                                                         early_stop=early_stop)))
        assert [len(row) for row in out] == [tokens, tokens]
        return count

    two_layers = reads(2, 8)
    assert reads(6, 8) == two_layers  # nothing per layer
    per_token = (two_layers - reads(2, 4)) / 4
    # The stop check (early_stop) and the model's "is any key padding" check of each decode step.
    assert per_token <= (2 if early_stop else 1), per_token


# ----------------------------------------------------------------------------- on the accelerator


@pytest.mark.gpu
def test_chat_greedy_on_the_accelerator_gives_the_cpu_tokens(vlm_run, tmp_path):
    from openspeed.accelerator import resolve_device
    from openspeed.inference.chat import answer_file
    from openspeed.training.run_loading import load_trained_model

    info, run = vlm_run
    image = _image(info)
    questions = tmp_path / "q.jsonl"
    asked = [QUESTION, "What colour is the circle?", "Is there a triangle?", "Where is the square?"]
    questions.write_text("".join(json.dumps({"image": image, "question": q}) + "\n" for q in asked))
    answers = []
    for i, device in enumerate(("cpu", _accelerator())):
        out = tmp_path / f"answers{i}.jsonl"
        assert answer_file(str(run), str(questions), str(out), max_new_tokens=12, batch_size=3,
                           device=device) == (4, 0)
        answers.append([json.loads(line)["prediction"] for line in out.read_text().splitlines()])
    assert answers[0] == answers[1] and any(answers[0])

    # The tokens themselves, and a KV cache that lives on the accelerator.
    from openspeed.data.collator import VLCollator
    from openspeed.inference.generate import build_prompt_sample, generate

    tokens = []
    for name in ("cpu", _accelerator()):
        device = resolve_device(name)
        model, processor, _, _ = load_trained_model(str(run), device)
        sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + QUESTION}], [image])
        batch = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)([sample])
        batch.pop("labels")
        # The batch stays on the CPU: generate moves it to the model's device.
        tokens.append(generate(model, batch, max_new_tokens=12, eos_token_id=-1, pad_token_id=processor.pad_token_id))
        cache = model.new_kv_cache(64)
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items() if v is not None}, kv_cache=cache)
        assert cache.layers[0]._keys.device == device and cache.next_positions.device == device
    assert tokens[0] == tokens[1] and len(tokens[0][0]) == 12


@pytest.mark.gpu
def test_eval_convert_and_generate_on_the_accelerator(capsys, vlm_run, wan_run, tmp_path):
    from openspeed.data.video_text import video_to_uint8
    from openspeed.models.wan.generate import generate_videos, load_trained_dit

    info, run = vlm_run
    accelerator = _accelerator()
    host, device = tmp_path / "host", tmp_path / "device"
    for where, name in ((host, "cpu"), (device, accelerator)):
        where.mkdir()
        code, _, err = _main(capsys, *_argv("eval", where, info, run), "--device", name)
        assert code == 0, err
        code, _, err = _main(capsys, "convert", run, "--to", "hf", "--out", where / "export", "--device", name)
        assert code == 0, err
    predictions = (host / "eval" / "predictions.jsonl").read_text()
    assert (device / "eval" / "predictions.jsonl").read_text() == predictions and predictions
    for path in (host / "export").iterdir():  # the same bytes, whichever device loaded the run
        assert path.read_bytes() == (device / "export" / path.name).read_bytes(), path.name

    code, _, err = _main(capsys, *_argv("generate", device, run=wan_run), "--device", accelerator)
    assert code == 0, err
    assert (device / "clip.png").is_file()
    on_host, on_device = (generate_videos(load_trained_dit(str(wan_run), name), ["a red square moves right"], steps=2)
                          for name in ("cpu", accelerator))
    assert on_device.device.type == "cpu"  # decoded clips come back to the host
    torch.testing.assert_close(on_device, on_host, atol=1e-4, rtol=0)
    assert abs(video_to_uint8(on_device[0]).astype(int) - video_to_uint8(on_host[0]).astype(int)).max() <= 1
