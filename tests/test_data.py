"""Tests for the data pipeline: shapes generator, tokenizer, processor, dataset and collator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openspeed.data.collator import VLCollator, count_label_tokens
from openspeed.data.conversation import ConversationDataset, render_conversation
from openspeed.data.processor import VLProcessor
from openspeed.data.shapes import (
    COLOURS,
    COUNT_WORDS,
    QTYPES,
    SHAPES,
    make_shapes_dataset,
    position_names,
    write_tiny_model_dir,
)
from openspeed.errors import BadSampleError, DataError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num=40, seed=3)


@pytest.fixture(scope="module")
def proc(shapes):
    return VLProcessor.from_pretrained(shapes["model_dir"])


def _write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def _unmasked_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled tokens, one per assistant reply."""
    runs, cur = [], []
    for tok in labels.tolist():
        if tok != -100:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# --- shapes generator and model dir ---------------------------------------------------------------


def test_shapes_generator_writes_what_it_says(shapes):
    root = shapes["root"]
    assert shapes["num_train"] + shapes["num_val"] == 40 and shapes["num_val"] == 4
    train = [json.loads(line) for line in open(shapes["train"])]
    val = [json.loads(line) for line in open(shapes["val"])]
    assert len(train) == 36 and len(val) == 4
    assert len(list((root / "images").glob("*.png"))) == 40
    positions = set(position_names(3))
    for rec in train + val:
        assert rec["qtype"] in QTYPES
        user, assistant = rec["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        assert assistant == {"role": "assistant", "content": rec["answer"]}
        assert 1 <= len(rec["answer"].split()) <= 2
        scene = rec["scene"]
        assert 1 <= len(scene) <= 4
        assert len({o["shape"] for o in scene}) == len(scene)  # kinds distinct, so questions are unambiguous
        expected = {
            "colour": set(COLOURS),
            "shape": set(SHAPES),
            "position": positions,
            "count": set(COUNT_WORDS[1:5]),
        }[rec["qtype"]]
        assert rec["answer"] in expected
        with Image.open(root / rec["images"][0]) as im:
            assert im.size == (112, 112) and im.mode == "RGB"
    assert {r["qtype"] for r in train + val} == set(QTYPES)
    cfg = json.loads((shapes["model_dir"] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["text_config"]["vocab_size"] % 64 == 0
    assert cfg["vision_config"]["fullatt_block_indexes"] == [1]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"):
        assert (shapes["model_dir"] / name).is_file()


def test_shapes_generator_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num=12, seed=7)
    b = make_shapes_dataset(tmp_path / "b", num=12, seed=7)
    c = make_shapes_dataset(tmp_path / "c", num=12, seed=8)
    for rel in ("train.jsonl", "val.jsonl", "images/000005.png", "model/tokenizer.json", "model/config.json"):
        assert (a["root"] / rel).read_bytes() == (b["root"] / rel).read_bytes(), rel
    assert (a["root"] / "train.jsonl").read_bytes() != (c["root"] / "train.jsonl").read_bytes()


def test_model_config_matches_tokenizer(shapes, proc):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(shapes["model_dir"])
    tok = proc.tokenizer
    assert cfg.image_token_id == proc.image_token_id
    assert cfg.video_token_id == proc.video_token_id
    assert cfg.vision_start_token_id == proc.vision_start_id
    assert cfg.vision_end_token_id == proc.vision_end_id
    assert cfg.text_config.eos_token_id == proc.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert proc.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(tok) <= cfg.text_config.vocab_size < len(tok) + 64
    assert cfg.text_config.num_key_value_heads % 4 == 0 and cfg.vision_config.intermediate_size % 4 == 0
    assert proc.merge_size == 2


def test_write_tiny_model_dir_overrides(tmp_path):
    out = write_tiny_model_dir(tmp_path / "m", ["hello world"], hidden_size=128, num_hidden_layers=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 128 and cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["out_hidden_size"] == 128


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_chat_template(proc, tmp_path):
    tok = proc.tokenizer
    for text in ["What colour is the triangle?", "top left", "Hello, unseen words 123!\n  two  spaces"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Words of the data set are single tokens (after a space), so sequences stay short.
    assert len(tok(" triangle", add_special_tokens=False)["input_ids"]) == 1

    convs = [
        [
            {"role": "user", "content": "What colour is the triangle?"},
            {"role": "assistant", "content": "red"},
        ],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How many shapes are there?"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "Where is the blue star?"},
            {"role": "assistant", "content": "top left"},
        ],
    ]
    path = _write_jsonl(tmp_path / "text.jsonl", [{"messages": c} for c in convs])
    ds = ConversationDataset(path, proc, max_seq_len=512)
    for i, conv in enumerate(convs):
        text = tok.apply_chat_template(conv, tokenize=False)
        assert render_conversation(conv)[0] == text
        ids = tok.apply_chat_template(conv, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ds[i]["input_ids"].tolist() == list(ids)
        assert ds[i]["pixel_values"] is None and ds[i]["pixel_values_videos"] is None


# --- dataset --------------------------------------------------------------------------------------


def test_labels_mask_everything_but_assistant_replies(shapes, proc, tmp_path):
    tok = proc.tokenizer
    ds = ConversationDataset(shapes["train"], proc, max_seq_len=256)
    for i in range(8):
        sample = ds[i]
        assert sample["labels"].shape == sample["input_ids"].shape
        keep = sample["labels"] != -100
        assert torch.equal(sample["labels"][keep], sample["input_ids"][keep])
        runs = _unmasked_runs(sample["labels"])
        assert [tok.decode(r) for r in runs] == [ds.record(i)["answer"] + "<|im_end|>"]

    # Multi-turn, ShareGPT spelling with a top-level system prompt, and a JSON-list file.
    image = Path(shapes["root"]) / "images" / "000000.png"
    rec = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "<image>How many shapes are there?"},
            {"from": "gpt", "value": "three"},
            {"from": "human", "value": "What colour is the star?"},
            {"from": "gpt", "value": "dark green"},
        ],
        "images": [str(image)],
    }
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([rec]))
    sample = ConversationDataset(path, proc, max_seq_len=256)[0]
    runs = [tok.decode(r) for r in _unmasked_runs(sample["labels"])]
    assert runs == ["three<|im_end|>", "dark green<|im_end|>"]
    text = tok.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")


def test_image_placeholders_equal_merged_patches(shapes, proc, tmp_path):
    ds = ConversationDataset(shapes["train"], proc, max_seq_len=256)
    sample = ds[0]
    grid = sample["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]
    assert sample["pixel_values"].shape == (64, 3 * 2 * 14 * 14)
    ids = sample["input_ids"]
    assert int((ids == proc.image_token_id).sum()) == 16 == int(grid.prod()) // proc.merge_size**2
    start = (ids == proc.vision_start_id).nonzero().item()
    assert ids[start + 17].item() == proc.vision_end_id

    # Two images of another aspect ratio; each block matches its own grid.
    Image.new("RGB", (200, 90), (10, 200, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (60, 60), (200, 10, 30)).save(tmp_path / "small.png")
    path = _write_jsonl(
        tmp_path / "two.jsonl",
        [{"messages": [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "x"}],
          "images": ["wide.png", "small.png"]}],
    )  # fmt: skip
    sample = ConversationDataset(path, proc, max_seq_len=512)[0]
    grids = sample["image_grid_thw"]
    assert grids.shape == (2, 3) and sample["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    ids = sample["input_ids"].tolist()
    starts = [k for k, t in enumerate(ids) if t == proc.vision_start_id]
    for s, g in zip(starts, grids.tolist(), strict=True):
        n = g[0] * g[1] * g[2] // 4
        assert ids[s + 1 : s + 1 + n] == [proc.image_token_id] * n and ids[s + 1 + n] == proc.vision_end_id


def test_bad_samples_raise_with_reason_and_others_load(shapes, proc, tmp_path):
    good_img = Path(shapes["root"]) / "images" / "000001.png"
    (tmp_path / "img").mkdir()
    data = good_img.read_bytes()
    (tmp_path / "img" / "ok.png").write_bytes(data)
    (tmp_path / "img" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "img" / "garbage.png").write_bytes(b"not a png at all")

    def rec(content, images=None, answer="red"):
        r = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
        if images is not None:
            r["images"] = images
        return r

    records = [
        rec("<image>What colour is the circle?", ["img/ok.png"]),  # 0 good
        rec("<image>Long?", ["img/ok.png"], answer=" ".join(["red"] * 300)),  # 1 too long
        rec("<image>Missing?", ["img/nope.png"]),  # 2 missing
        rec("<image>Truncated?", ["img/truncated.png"]),  # 3 truncated PNG
        '{"messages": [{"role": "user", "content": "broken',  # 4 malformed JSON line
        rec("<image><image>Two tags, one image", ["img/ok.png"]),  # 5 tag/image mismatch
        rec("No tag", ["img/ok.png"]),  # 6 mismatch the other way
        {"messages": [{"role": "user", "content": "no reply"}]},  # 7 no assistant turn
        rec("<image>Garbage?", ["img/garbage.png"]),  # 8 not an image
        rec("<image>Fine again", ["img/ok.png"]),  # 9 good
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", records)
    ds = ConversationDataset(path, proc, max_seq_len=128)
    assert len(ds) == 10
    expected = {
        1: "too_long",
        2: "missing_file",
        3: "corrupt_media",
        4: "malformed_record",
        5: "malformed_record",
        6: "malformed_record",
        7: "malformed_record",
        8: "corrupt_media",
    }
    for i, reason in expected.items():
        with pytest.raises(BadSampleError) as err:
            ds[i]
        assert err.value.reason == reason, (i, err.value)
    with pytest.raises(BadSampleError, match="line 5"):
        ds.record(4)
    for i in (0, 9):
        assert ds[i]["input_ids"].numel() > 0
    assert ds.record(9)["messages"][1]["content"] == "red"

    with pytest.raises(DataError, match="nothing.jsonl"):
        ConversationDataset(tmp_path / "nothing.jsonl", proc, max_seq_len=128)


# --- collator -------------------------------------------------------------------------------------


def test_collator_pads_and_types_tokens(shapes, proc, tmp_path):
    ds = ConversationDataset(shapes["train"], proc, max_seq_len=256)
    text_path = _write_jsonl(
        tmp_path / "t.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "top left"}]}],
    )
    text_sample = ConversationDataset(text_path, proc, max_seq_len=256)[0]
    samples = [ds[0], text_sample, ds[1]]
    collate = VLCollator(proc.pad_token_id, proc.image_token_id, proc.video_token_id, pad_to_multiple_of=16)
    batch = collate(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    width = batch["input_ids"].shape[1]
    assert width % 16 == 0 and width >= max(lengths) and width < max(lengths) + 16
    for b, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])
        assert (batch["input_ids"][b, n:] == proc.pad_token_id).all()
        assert batch["attention_mask"][b].sum() == n and (batch["attention_mask"][b, n:] == 0).all()
        assert (batch["labels"][b, n:] == -100).all()
    mm = batch["mm_token_type_ids"]
    assert torch.equal(mm == 1, batch["input_ids"] == proc.image_token_id)
    assert int((mm[1] != 0).sum()) == 0 and not (mm == 2).any()
    assert batch["pixel_values"].shape[0] == 128 and batch["image_grid_thw"].shape == (2, 3)
    assert "pixel_values_videos" not in batch and "second_per_grid_ts" not in batch
    manual = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    assert count_label_tokens(batch) == manual
    # Replies are never the first token, so the shift drops nothing here.
    assert manual == sum(int((s["labels"] != -100).sum()) for s in samples)

    capped = VLCollator(proc.pad_token_id, proc.image_token_id, proc.video_token_id, 64, max_len=max(lengths))
    assert capped(samples)["input_ids"].shape[1] == max(lengths)
    with pytest.raises(BadSampleError):
        VLCollator(proc.pad_token_id, proc.image_token_id, proc.video_token_id, max_len=10)(samples)


# --- video ----------------------------------------------------------------------------------------


def _frame(seed: int, size=(150, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_native_image_patching_equals_image_processor(proc):
    # Sizes that need resizing (both ways), one already at its target size, and a grayscale image.
    images = [_frame(3, (150, 100)), _frame(4, (56, 56)), _frame(5, (30, 200)), _frame(6, (112, 112))]
    images.append(_frame(7, (84, 140)).convert("L"))
    pv, grid = proc.process_images(images)
    reference = proc.image_processor(images=images, return_tensors="pt")
    assert torch.equal(grid, reference["image_grid_thw"].long())
    assert pv.dtype == torch.float32 and pv.shape == reference["pixel_values"].shape
    assert torch.allclose(pv, reference["pixel_values"].float(), atol=1e-6, rtol=0)


def test_native_video_patching_matches_image_processor(proc):
    a, b, c = _frame(0), _frame(1), _frame(2)
    pv, grid, spg = proc.process_video([a, a, b, b, c, c], fps=4.0)
    ipv, igrid = proc.process_images([a, b, c])
    assert grid.tolist() == [[3, int(igrid[0, 1]), int(igrid[0, 2])]]
    assert (igrid[:, 1:] == grid[0, 1:]).all()
    assert pv.shape == ipv.shape
    assert torch.allclose(pv, ipv, atol=1e-6, rtol=0)
    assert spg == pytest.approx(2 / 4.0)

    # An odd frame count is padded by repeating the last frame; a uint8 array works too.
    arr = np.stack([np.asarray(f) for f in (a, a, b)])
    pv3, grid3, _ = proc.process_video(arr, fps=2.0)
    ipv2, _ = proc.process_images([a, b])
    assert grid3[0, 0].item() == 2 and torch.allclose(pv3, ipv2, atol=1e-6, rtol=0)


def _write_mp4(path: Path, n_frames: int, fps: int = 10, size: int = 64) -> None:
    import av

    codec = "mpeg4" if "mpeg4" in av.codecs_available else "libx264"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            img = np.full((size, size, 3), (k * 20) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_load_video_from_mp4_and_folder(proc, tmp_path):
    video = tmp_path / "clip.mp4"
    _write_mp4(video, n_frames=10, fps=10)
    frames, fps = proc.load_video(video)
    assert len(frames) == 10 and fps == pytest.approx(10.0)
    assert frames[0].size == (64, 64) and frames[0].mode == "RGB"
    frames, fps = proc.load_video(video, num_frames=4)
    assert len(frames) == 4 and fps == pytest.approx(4.0)
    frames, fps = proc.load_video(video, fps=5.0)
    assert len(frames) == 5 and fps == pytest.approx(5.0)
    frames, fps = proc.load_video(video, fps=5.0, max_frames=2)
    assert len(frames) == 2 and fps == pytest.approx(2.0)

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(11):
        Image.new("RGB", (56, 56), (k * 20, 0, 0)).save(folder / f"frame_{k}.png")
    frames, fps = proc.load_video(folder)
    assert len(frames) == 11 and fps == 2.0
    assert [f.getpixel((0, 0))[0] for f in frames] == [
        k * 20 for k in range(11)
    ]  # numeric, not string, order
    frames, fps = proc.load_video(folder, num_frames=3, fps=6.0)
    assert len(frames) == 3 and fps == pytest.approx(6.0 * 3 / 11)

    with pytest.raises(BadSampleError) as err:
        proc.load_video(tmp_path / "nope.mp4")
    assert err.value.reason == "missing_file"
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(BadSampleError) as err:
        proc.load_video(tmp_path / "bad.mp4")
    assert err.value.reason == "corrupt_media"


def test_video_sample_in_dataset(proc, tmp_path):
    _write_mp4(tmp_path / "clip.mp4", n_frames=10, fps=10)
    path = _write_jsonl(
        tmp_path / "video.jsonl",
        [{"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "fade"}],
          "videos": ["clip.mp4"]}],
    )  # fmt: skip
    sample = ConversationDataset(path, proc, max_seq_len=512, video_fps=4.0)[0]
    grid = sample["video_grid_thw"]
    # 10 frames at 10 fps sampled at 4 fps -> 4 frames -> 2 temporal patches of 56x56 (4x4 patches).
    assert grid.tolist() == [[2, 4, 4]]
    assert sample["second_per_grid_ts"].tolist() == pytest.approx([0.5])
    assert int((sample["input_ids"] == proc.video_token_id).sum()) == 8
    batch = VLCollator(proc.pad_token_id, proc.image_token_id, proc.video_token_id)([sample])
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 8
    assert batch["pixel_values_videos"].shape == (32, 1176) and "pixel_values" not in batch
