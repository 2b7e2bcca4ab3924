"""KV-cache decoding of the native Qwen2.5-VL: the cache must not change a single token.

References: decoding without the cache (the full forward every step), each row decoded alone and
unpadded, the full forward's logits, and Hugging Face's ``generate`` with the same weights.
"""

from __future__ import annotations

import pytest
import torch
from _qwen_tiny import IMAGE_ID, PAD_ID, VIDEO_ID, make_batch, native_config, random_hf_model

from openspeed.inference import filter_logits, generate, greedy_generate, next_tokens
from openspeed.models.qwen2_5_vl import Qwen2_5_VLModel, hf_to_native

MAX_NEW = 6
# Prompts end with text, as a chat prompt does. Row 2's video has 4 temporal steps 2 positions apart
# (1 s/grid x 2 tokens/s) on a 2x2 merged grid: its temporal positions (up to start + 6) run past
# the text after it (start + 2, start + 3), the case where Hugging Face's cached decoding ("max + 1"
# rope deltas) departs from its own full forward; decoding here follows the full forward.
IMAGE_PROMPTS = [
    [("text", 5), ("image", [1, 8, 12]), ("text", 4)],
    [("text", 3), ("image", [1, 6, 10]), ("text", 2), ("image", [1, 4, 4]), ("text", 3)],
    [("text", 2), ("video", [4, 4, 4], 1.0), ("text", 2)],
]
# For the comparison with Hugging Face: a video whose positions the text after it overtakes.
HF_PROMPTS = [*IMAGE_PROMPTS[:2], [("text", 2), ("video", [2, 4, 6], 0.5), ("text", 5)]]
TEXT_PROMPTS = [[("text", 9)], [("text", 4)], [("text", 6)]]


@pytest.fixture(scope="module")
def models():
    """A random tiny HF model and the native model with the same weights."""
    hf = random_hf_model(seed=3)
    config = native_config()
    native = Qwen2_5_VLModel(config)
    state = hf_to_native(hf.state_dict(), config)
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    return hf, native.eval()


def _left_padded(batch: dict) -> dict:
    """The same batch with every row's tokens moved to the right end (padding on the left)."""
    out = dict(batch)
    mask = batch["attention_mask"]
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        rows = []
        for b in range(mask.shape[0]):
            row, n = batch[key][b], int(mask[b].sum())
            fill = PAD_ID if key == "input_ids" else 0
            rows.append(torch.cat([torch.full((row.numel() - n,), fill, dtype=row.dtype), row[:n]]))
        out[key] = torch.stack(rows)
    return out


def _row(batch: dict, b: int) -> dict:
    """Row ``b`` alone and unpadded, with its own images/videos' grids and pixels."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "mm_token_type_ids": batch["mm_token_type_ids"][b][real][None]}
    for kind, token in (("image", IMAGE_ID), ("video", VIDEO_ID)):
        grid_key = f"{kind}_grid_thw"
        pixel_key = "pixel_values" if kind == "image" else "pixel_values_videos"
        if grid_key not in batch:
            continue
        grids = batch[grid_key]
        merged = (grids.prod(-1) // 4).tolist()  # placeholder tokens per grid (merge 2x2)
        before = int((batch["input_ids"][:b] == token).sum())
        mine = int((ids == token).sum())
        first = next(i for i in range(len(merged) + 1) if sum(merged[:i]) >= before)
        last = next(i for i in range(first, len(merged) + 1) if sum(merged[first:i]) >= mine)
        if last == first:
            continue
        patches = grids.prod(-1).tolist()
        out[grid_key] = grids[first:last]
        out[pixel_key] = batch[pixel_key][sum(patches[:first]) : sum(patches[:last])]
        if kind == "video":
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][first:last]
    return out


@torch.no_grad()
def _reference_greedy(model, row: dict, max_new: int, eos: int) -> list[int]:
    """Plain greedy decoding of one unpadded row: the full forward on the growing sequence."""
    ids, types, out = row["input_ids"], row["mm_token_type_ids"], []
    vision = {k: v for k, v in row.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for _ in range(max_new):
        logits = model(input_ids=ids, mm_token_type_ids=types, **vision).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        types = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], dim=1)
    return out


def _decode(model, batch, eos: int, **kwargs) -> list[list[int]]:
    return generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD_ID, **kwargs)


def _stop_at(tokens: list[int], index: int) -> tuple[int, int]:
    """(an EOS id, where it stops the row): the first token from ``index`` on not produced earlier."""
    at = next(i for i in range(index, len(tokens)) if tokens[i] not in tokens[:i])
    return tokens[at], at


def _batch(prompts, padding: str) -> dict:
    batch = make_batch(prompts, seed=5)
    batch.pop("labels")
    return _left_padded(batch) if padding == "left" else batch


@pytest.mark.parametrize("prompts", ["image", "text"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_cache_equals_no_cache_and_unpadded_rows(models, prompts, padding):
    _, model = models
    batch = _batch(IMAGE_PROMPTS if prompts == "image" else TEXT_PROMPTS, padding)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(lengths)  # every row is padded differently
    # An EOS the model really produces (in row 0, after a token or two), so stopping is exercised.
    eos, stop = _stop_at(_decode(model, batch, eos=-1)[0], 1)
    expected = [_reference_greedy(model, _row(batch, b), MAX_NEW, eos) for b in range(len(lengths))]
    assert len(expected[0]) == stop < MAX_NEW and any(len(row) == MAX_NEW for row in expected)
    cached = _decode(model, batch, eos)
    uncached = _decode(model, batch, eos, use_cache=False)
    assert cached == uncached == expected
    assert greedy_generate(model, batch, MAX_NEW, eos, PAD_ID) == expected


@pytest.mark.parametrize("padding", ["right", "left"])
def test_decode_step_logits_equal_full_forward(models, padding):
    _, model = models
    batch = _batch(IMAGE_PROMPTS, padding)
    bsz = batch["input_ids"].shape[0]
    new = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])  # 3 decode steps
    cache = model.new_kv_cache()
    with torch.no_grad():
        full_prompt = model(**batch).logits
        prefill = model(**batch, kv_cache=cache).logits
        assert torch.equal(prefill, full_prompt)  # the prefill is the ordinary forward
        mask = batch["attention_mask"]
        worst = 0.0
        for step in range(new.shape[1]):
            # Row 1 has finished after the first step: its later columns are padding.
            real = torch.tensor([[1], [int(step == 0)], [1]])
            mask = torch.cat([mask, real], dim=1)
            step_logits = model(input_ids=new[:, step : step + 1], attention_mask=mask, kv_cache=cache).logits
            text_types = torch.zeros(bsz, step + 1, dtype=batch["mm_token_type_ids"].dtype)
            full = model(
                input_ids=torch.cat([batch["input_ids"], new[:, : step + 1]], dim=1),
                attention_mask=mask,
                mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], text_types], 1),
                **{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")},
            ).logits
            rows = [0, 2] if step else [0, 1, 2]  # a padding query's logits mean nothing
            worst = max(worst, float((step_logits[rows, -1] - full[rows, -1]).abs().max()))
    print(f"{padding}: max |cached decode logits - full forward| = {worst:.2e}")
    assert worst < 1e-5
    assert len(cache) == batch["input_ids"].shape[1] + new.shape[1]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_positions_select_one_position_per_row(models, padding):
    # A prompt pass forms logits at each row's last real token only, equal to the full forward's.
    _, model = models
    batch = _batch(IMAGE_PROMPTS, padding)
    last = batch["attention_mask"].long().cumsum(1).argmax(1)  # each row's last real position
    with torch.no_grad():
        full = model(**batch).logits
        picked = model(**batch, logits_positions=last).logits
    assert picked.shape == (full.shape[0], 1, full.shape[-1])
    # the same rows through the head (a matmul of another shape: rounding may differ in the last bit)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(full.shape[0]), last], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no labels"):
        model(**batch, labels=batch["input_ids"], logits_positions=last)


def test_cache_errors(models):
    _, model = models
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="packed"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 3]), kv_cache=model.new_kv_cache())
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(input_ids=ids, kv_cache=cache)
        with pytest.raises(ValueError, match="one new token"):
            model(input_ids=ids[:, :2], kv_cache=cache)


def test_hf_generate_matches(models):
    """Hugging Face's own cached greedy decoding (left padding, as it expects): same tokens, and the
    same logits at every step."""
    hf, model = models
    batch = _batch(HF_PROMPTS, "left")
    never = 199  # an EOS id no row produces, so every row runs all MAX_NEW steps
    with torch.no_grad():
        out = hf.generate(
            **batch, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=never, pad_token_id=PAD_ID,
            output_logits=True, return_dict_in_generate=True,
        )
    theirs = out.sequences[:, batch["input_ids"].shape[1] :]
    assert never not in theirs.tolist()
    assert _decode(model, batch, never) == theirs.tolist()

    # Our cached steps fed with their tokens: the logits of every step agree.
    cache = model.new_kv_cache()
    with torch.no_grad():
        logits = [model(**batch, kv_cache=cache).logits[:, -1]]
        mask = batch["attention_mask"]
        for step in range(MAX_NEW - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_out = model(input_ids=theirs[:, step : step + 1], attention_mask=mask, kv_cache=cache)
            logits.append(step_out.logits[:, -1])
    diff = max(float((ours - ref).abs().max()) for ours, ref in zip(logits, out.logits))
    print(f"max |logit diff| vs HF generate over {MAX_NEW} steps = {diff:.2e}")
    assert diff < 1e-4

    # And with an EOS that stops row 0 early, the tokens still agree.
    eos, stop = _stop_at(theirs[0].tolist(), 1)
    with torch.no_grad():
        sequences = hf.generate(
            **batch, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID
        )
    expected = []
    for row in sequences[:, batch["input_ids"].shape[1] :].tolist():
        expected.append(row[: row.index(eos)] if eos in row else row)
    ours = _decode(model, batch, eos)
    assert ours == expected and len(ours[0]) == stop < MAX_NEW


def test_filter_logits_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # a second row in another token order
    logits = torch.stack([probs.log(), probs[perm].log()])

    def kept(temperature: float, top_p: float) -> list[list[int]]:
        scores = filter_logits(logits, temperature, top_p)
        return [torch.isfinite(row).nonzero().squeeze(1).tolist() for row in scores]

    # Cumulative mass of the tokens ranked above each: 0, 0.5, 0.8, 0.95.
    assert kept(1.0, 0.4) == [[0], [1]]
    assert kept(1.0, 0.7) == [[0, 1], [1, 3]]
    assert kept(1.0, 0.9) == [[0, 1, 2], [0, 1, 3]]
    assert kept(1.0, 1.0) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # Temperature 2 flattens first (probs ~ sqrt: 0.379, 0.294, 0.207, 0.120): 0.7 keeps three.
    assert kept(2.0, 0.7) == [[0, 1, 2], [0, 1, 3]]
    torch.testing.assert_close(filter_logits(logits, 2.0), logits / 2)
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)

    # Draws follow the renormalised nucleus, and filtered tokens never come up.
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor(next_tokens(logits[:1].expand(4000, -1), do_sample=True, top_p=0.9, generator=gen))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03, rtol=0)
    assert freq[3] == 0


def test_sampling(models):
    _, model = models
    batch = _batch(IMAGE_PROMPTS, "right")
    greedy = _decode(model, batch, eos=-1)

    def sample(seed: int, **kwargs) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return _decode(model, batch, eos=-1, do_sample=True, generator=gen, **kwargs)

    # A nucleus this small holds only the most likely token: sampling is greedy decoding.
    assert sample(0, top_p=1e-6) == greedy
    hot = sample(1, temperature=3.0)
    assert hot == sample(1, temperature=3.0)  # seeded: reproducible
    assert hot != sample(2, temperature=3.0) and hot != greedy
    # The cache changes the logits by rounding only, so the same seed draws the same tokens.
    assert hot == sample(1, temperature=3.0, use_cache=False)
    with pytest.raises(ValueError, match="temperature"):
        sample(0, temperature=-1.0)


def test_eos_stops_rows_and_early_stop(models):
    _, model = models
    batch = _batch(IMAGE_PROMPTS, "left")
    free = _decode(model, batch, eos=-1)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        # Every row stops at its first token: one forward (the prefill), nothing returned.
        one = _batch(IMAGE_PROMPTS[:1], "left")
        first = _decode(model, one, eos=-1)[0][0]
        calls.clear()
        assert _decode(model, one, eos=first) == [[]]
        assert len(calls) == 1
        # Row 0's second token as EOS: row 0 stops there, the others run on (unless they hit it).
        eos, _ = _stop_at(free[0], 1)
        calls.clear()
        got = _decode(model, batch, eos)
        assert got[0] == free[0][: free[0].index(eos)]
        for row, full in zip(got[1:], free[1:]):
            assert row == (full[: full.index(eos)] if eos in full else full)
        # Distributed callers: exactly MAX_NEW forwards, whatever the rows do.
        calls.clear()
        assert _decode(model, batch, eos, early_stop=False) == got
        assert len(calls) == MAX_NEW
    finally:
        handle.remove()


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "0"), ("--top-p", "0"), ("--top-p", "1.5")])
def test_chat_sampling_flags_are_one_line_errors(capsys, flag, value):
    from openspeed.cli import main

    assert main(["chat", "--checkpoint", ".", flag, value, "hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


def _tp_worker(rank: int, out_dir: str) -> None:
    import json
    import os

    from test_tensor_parallel import _build_parallel, _dims, _init

    config = native_config()
    reference = Qwen2_5_VLModel(config)
    _init(reference)
    batch = _batch(IMAGE_PROMPTS, "right")
    expected = _decode(reference, batch, eos=-1, use_cache=False)
    # Sequence parallel too: a decode step's single token is split unevenly over the tp ranks.
    model = _build_parallel(config, _dims({"tp": 2}), sequence_parallel=True)
    got = _decode(model, batch, eos=-1)  # every rank caches its own heads' keys/values
    if rank == 0:
        with open(os.path.join(out_dir, "tp.json"), "w", encoding="utf-8") as fh:
            json.dump({"expected": expected, "got": got}, fh)


def test_cache_under_tensor_parallel(tmp_path):
    """tp=2 with sequence parallelism: cached decoding gives the one-process tokens."""
    import json

    from _spawn import run_workers

    run_workers(_tp_worker, 2, str(tmp_path))
    result = json.loads((tmp_path / "tp.json").read_text())
    assert result["got"] == result["expected"]
