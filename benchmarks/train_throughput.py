"""Training throughput of OpenSpeed's Qwen2.5-VL against Hugging Face transformers, side by side.

Run ``python -m benchmarks.train_throughput [--quick] [--steps N] [--threads N] [--precision fp32|bf16|both]
[--profile]`` (default: both precisions, 3 timed steps, every CPU the process may use as intra-op threads).
Results and their reading: ``benchmarks/RESULTS.md``.

The model is a ~60M-parameter Qwen2.5-VL (text: vocab 32000, hidden 512, MLP 1408, 8 layers,
8 query / 2 key-value heads, ``mrope_section`` [8, 12, 12], rope theta 1e6; vision: depth 4, hidden 256,
MLP 704, 4 heads, patch 14, merge 2, temporal patch 2, window 112, full attention in block 3). It is
built once from a seed (``openspeed.models.init.init_weights``, as the trainer initialises), and the
same weights are loaded into every OpenSpeed copy and, renamed with ``native_to_hf``, into Hugging
Face's ``Qwen2_5_VLForConditionalGeneration`` (built from the same config, SDPA attention).

The data. Every sample is text around one 448x448 image: 32 prompt tokens, ``<vision_start>``, 256
image pad tokens (the 32x32 patch grid merged 2x2), ``<vision_end>``, then answer tokens, which alone
carry labels. Pixels are given directly in the patch layout the processor would produce
(``pixel_values`` (1024, 3*2*14*14) per image, ``image_grid_thw`` [[1, 32, 32]]). Batches are collated
by ``openspeed.data.collator.VLCollator``, as the trainer collates them; HF gets the same padded batch.

One training step is forward, backward, optimizer step and ``zero_grad``, timed with the wall clock:

* OpenSpeed at optimization level 0, 1 and 2: the loss call the trainer makes
  (``VLMTask.loss``: ``num_items_in_batch`` = the batch's target count, ``return_logits=False``), with
  the optimizer ``openspeed.training.optim.build_optimizer`` gives at that level (plain
  ``torch.optim.AdamW`` at 0, the fused ``AdamWEMA`` step from 1 on);
* Hugging Face: ``model(**batch)`` with ``labels`` (HF computes its own loss) and a plain
  ``torch.optim.AdamW(model.parameters())`` loop, what a user would otherwise write;
* OpenSpeed level 2 with every transformer block compiled (``train.compile``, inductor; the warm-up
  step compiles);
* (full run) OpenSpeed level 2 with ``memory.recompute=full`` on every layer.

Both sides run the step under the same ``torch.autocast`` (``Accelerator.autocast``; fp32 = no
autocast), with fp32 weights, the same AdamW hyper-parameters and no gradient clipping. The variants
alternate step by step (round robin, the order rotated every round) so that load from other processes
falls on all of them alike: first one warm-up step each, then ``--steps`` rounds; a variant's figure is
its median step time. Tokens/s counts the real (non-padding) tokens; TFLOPS uses the analytic training
FLOPs of the batch (``VLMTask.flops``: vision tower, merger and LLM matmuls plus attention, over real
tokens only) and MFU divides them by the matmul peak of the step's dtype, ``Accelerator.peak_flops``
measured just before and just after the rounds (through a private cache directory, so that a figure
cached under other load is neither read nor written) and the better of the two taken. "Saved MiB" is
what autograd keeps for backward during one training forward (``openspeed.memory.SavedBytesMeter``;
parameters excluded, bf16 weight copies made by autocast included). The 1-minute load average is
sampled after every round and printed with each table.

The second table uses variable-length samples from a long-tailed distribution: each is its image and
prompt (290 tokens) plus an answer whose length is drawn from a lognormal (median 120 tokens, log-sd
1.0, seed 0), capped at 1024 tokens in all; 8 samples in drawn order, batched in pairs. HF and "OpenSpeed padded" get each pair right-padded to its longer sample
(what HF's collators do by default); "OpenSpeed packed" gets the same pair as one packed row
(``VLCollator(packing=True)``, ``cu_seqlens``), as ``data.packing=true`` trains. Each variant's
figure is the real tokens of a whole pass over the pairs divided by the sum of the per-pair median
step times.

Before any timing the losses are compared: in fp32, every OpenSpeed level and HF on the same batch
(and the packed row against HF's padded pair) must agree within 1e-4, otherwise the run stops; once at
the random init and once more on the weights after 3 OpenSpeed training steps (copied into HF). The
bf16 matmul rate is measured first: below 5 GFLOP/s (CPUs without native bf16) the bf16 rows are
skipped with one line saying so.

The last lines give the ratios (OpenSpeed level 2 compiled, and uncompiled, / HF tokens/s; packed / HF
useful tokens/s), bf16 compiled last. ``--quick``: bf16 only, level 2 compiled against HF on the equal
batch, no saved-bytes column, no second table, and only level 2's loss checked; its last stdout line is
``openspeed/hf bf16 tokens/s: <ratio>``.
``--profile``: instead of the tables, one profiled step of HF and each level on the equal batch: time per
phase, per op category and the slowest matmuls with their GFLOP/s (where the time goes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import profile, record_function

from benchmarks.machine import commit, cpu_name, load_1min, load_averages
from openspeed.accelerator import get_accelerator
from openspeed.config import OptimConfig
from openspeed.data.collator import VLCollator, count_label_tokens
from openspeed.errors import ConfigError, OpenSpeedError
from openspeed.memory import SavedBytesMeter, apply_recompute
from openspeed.models.init import init_weights
from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLModel, native_to_hf
from openspeed.models.qwen2_5_vl.config import TextConfig, VisionConfig
from openspeed.models.qwen2_5_vl.memory_plan import memory_plan
from openspeed.models.registry import get_model_spec
from openspeed.ops.level import optimization_level_scope
from openspeed.tasks.vlm_sft import MODEL_INPUTS, VLMTask
from openspeed.training.compile import compile_blocks
from openspeed.training.optim import build_optimizer

MiB = 1024 * 1024

# Token ids: ordinary text is drawn from [3, TEXT_TOP); the special ids sit at the top of the vocabulary.
VOCAB = 32000
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_TOP = 31000
VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = 31996, 31997, 31998, 31999

SEQ_LEN = 1024
BATCH = 2
PROMPT_TOKENS = 32
IMAGE_GRID = (1, 32, 32)  # 448x448 pixels in 14-pixel patches (one temporal patch of 2 frames)
# Variable-length samples: the image and prompt (290 tokens) plus a long-tailed answer length drawn
# from a lognormal (of median VAR_ANSWER_MEDIAN tokens, log-sd VAR_ANSWER_SIGMA; seed 0), each sample
# capped at SEQ_LEN: most samples are short, a few are long, as in real instruction data.
VAR_ANSWER_MEDIAN = 120
VAR_ANSWER_SIGMA = 1.0
VAR_SAMPLES = 8
TRAINED_STEPS = 3  # the loss check is repeated on weights trained this many steps
BF16_USABLE_GFLOPS = 5.0  # below this bf16 matmul rate (some CPUs emulate bf16) the bf16 rows are skipped

SEED = 0
LEVEL2, LEVEL2_COMPILED = "OpenSpeed level 2", "OpenSpeed level 2 + compile"
LOSS_TOLERANCE = 1e-4
OPTIM = OptimConfig(lr=1e-4, weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8)


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


def benchmark_config(shape: str = "60m", text_layers: int | None = None, vision_depth: int | None = None
                     ) -> Qwen2_5_VLConfig:
    """The benchmark's ~60M-parameter Qwen2.5-VL, or (``shape="3b"``, for accelerators) one with
    Qwen2.5-VL-3B's widths (vision 1280 x 32 blocks, text 2048 x 36 layers, MLP 11008, 16 / 2 heads;
    the benchmark's 32000-token vocabulary), optionally with fewer layers to fit beside HF's copy."""
    if shape == "3b":
        config = benchmark_config()
        vision, text = config.vision, config.text
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 32, 1280, 3420, 16
        vision.out_hidden_size, vision.fullatt_block_indexes = 2048, (7, 15, 23, 31)
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 2048, 11008, 36
        text.num_attention_heads, text.num_key_value_heads, text.mrope_section = 16, 2, (16, 24, 24)
        if vision_depth is not None:
            vision.depth = vision_depth
            vision.fullatt_block_indexes = tuple(i for i in vision.fullatt_block_indexes if i < vision_depth)
        if text_layers is not None:
            text.num_hidden_layers = text_layers
        return config
    return Qwen2_5_VLConfig(
        vision=VisionConfig(
            depth=4,
            hidden_size=256,
            intermediate_size=704,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=512,
            fullatt_block_indexes=(3,),
        ),
        text=TextConfig(
            vocab_size=VOCAB,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            mrope_section=(8, 12, 12),
            max_position_embeddings=4096,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def reference_state(config: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """The seeded initial weights (native names), as the trainer draws them from (seed, name)."""
    model = Qwen2_5_VLModel(config)
    init_weights(model, SEED, get_model_spec("qwen2_5_vl").init_std(config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def native_model(config: Qwen2_5_VLConfig, state: dict[str, torch.Tensor]) -> Qwen2_5_VLModel:
    model = Qwen2_5_VLModel(config)
    model.load_state_dict(state, strict=True)
    return model.to(get_accelerator().device).train()


def hf_model(config: Qwen2_5_VLConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """HF's ``Qwen2_5_VLForConditionalGeneration`` from the same config, with the same weights."""
    import transformers

    hf_config = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
        hf_config, attn_implementation="sdpa", dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(native_to_hf(state, config), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(get_accelerator().device).train()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_sample(gen: torch.Generator, length: int, patch_dim: int) -> dict[str, torch.Tensor]:
    """One ``length``-token sample: prompt, the image block, then the answer (the only labelled part)."""
    t, h, w = IMAGE_GRID
    image_tokens = t * h * w // 4
    answer = length - PROMPT_TOKENS - image_tokens - 2
    if answer < 2:
        raise ValueError(f"a {length}-token sample has no room for an answer next to its image")
    prompt_ids = torch.randint(3, TEXT_TOP, (PROMPT_TOKENS,), generator=gen)
    answer_ids = torch.randint(3, TEXT_TOP, (answer,), generator=gen)
    image = torch.full((image_tokens,), IMAGE_ID)
    input_ids = torch.cat(
        (prompt_ids, torch.tensor([VISION_START_ID]), image, torch.tensor([VISION_END_ID]), answer_ids)
    )
    labels = torch.full_like(input_ids, -100)
    labels[-answer:] = answer_ids
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.randn(t * h * w, patch_dim, generator=gen),
        "image_grid_thw": torch.tensor([IMAGE_GRID]),
    }


def collator(packing: bool) -> VLCollator:
    return VLCollator(pad_token_id=PAD_ID, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, packing=packing)


def equal_batch(config: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """``BATCH`` samples of exactly ``SEQ_LEN`` tokens (no padding)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return collator(False)([make_sample(gen, SEQ_LEN, config.vision.patch_dim) for _ in range(BATCH)])


def variable_lengths() -> list[int]:
    """``VAR_SAMPLES`` sample lengths: 290 image + prompt tokens plus a lognormal answer (seed 0), capped."""
    import math

    gen = torch.Generator().manual_seed(0)
    answers = torch.empty(VAR_SAMPLES).log_normal_(math.log(VAR_ANSWER_MEDIAN), VAR_ANSWER_SIGMA, generator=gen)
    fixed = PROMPT_TOKENS + IMAGE_GRID[1] * IMAGE_GRID[2] // 4 + 2
    return [min(SEQ_LEN, fixed + max(1, round(float(a)))) for a in answers]


def variable_pairs(config: Qwen2_5_VLConfig) -> list[list[dict[str, torch.Tensor]]]:
    """``VAR_SAMPLES`` samples of :func:`variable_lengths`, in drawn order, grouped in pairs."""
    gen = torch.Generator().manual_seed(SEED + 2)
    samples = [make_sample(gen, n, config.vision.patch_dim) for n in variable_lengths()]
    return [samples[i : i + BATCH] for i in range(0, len(samples), BATCH)]


def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the accelerator's device (a no-op on the CPU)."""
    return VLMTask.to_device(batch, get_accelerator().device)


def hf_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a user hands HF: the padded batch with labels (HF shifts them and takes the token mean)."""
    keys = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: batch[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# Variants: one model + optimizer + batches each
# --------------------------------------------------------------------------------------------------


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], hf: bool) -> torch.Tensor:
    """The loss each side trains on: HF's own (``labels`` in, token mean out), or OpenSpeed's trainer call."""
    if hf:
        return model(**hf_inputs(batch)).loss
    # VLMTask.loss, as the trainer calls it (the global target count is this batch's).
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    return model(**inputs, num_items_in_batch=max(1, count_label_tokens(batch)), return_logits=False).loss


def saved_for_backward(
    model: nn.Module, batch: dict[str, torch.Tensor], level: int | None, precision: str
) -> tuple[int, int]:
    """(device, host) bytes autograd keeps for backward during one training forward (``level`` None: HF)."""
    with optimization_level_scope(2 if level is None else level), get_accelerator().autocast(precision):
        with SavedBytesMeter(exclude=model) as meter:
            loss = training_loss(model, batch, hf=level is None)
    del loss
    return meter.report.device, meter.report.host


@dataclass
class Variant:
    """One row of a table: a model, its optimizer, how it computes the loss, and its batches."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    level: int | None  # None: Hugging Face
    batches: list[dict[str, torch.Tensor]]
    times: list[list[float]] = field(default_factory=list)  # per batch, timed steps

    @property
    def is_hf(self) -> bool:
        return self.level is None

    def scope(self):
        """The optimization level this variant runs at (HF's ops ignore it)."""
        return optimization_level_scope(2 if self.is_hf else self.level)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return training_loss(self.model, batch, self.is_hf)

    def step(self, batch: dict[str, torch.Tensor], precision: str) -> float:
        """One full training step; returns its wall-clock seconds."""
        acc = get_accelerator()
        acc.synchronize()
        start = time.perf_counter()
        # The phase labels cost nothing unless a profiler is recording (--profile).
        with self.scope(), acc.autocast(precision):
            with record_function("phase: forward"):
                loss = self.loss(batch)
            with record_function("phase: backward"):
                loss.backward()
        with record_function("phase: optimizer step + zero_grad"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        acc.synchronize()
        return time.perf_counter() - start

    def saved_bytes(self, precision: str) -> int:
        """All bytes (device + host) kept for backward by one training forward on the first batch."""
        return sum(saved_for_backward(self.model, self.batches[0], self.level, precision))


def openspeed_variant(
    name: str, config: Qwen2_5_VLConfig, state: dict, level: int, batches: list, recompute: str = "none",
    compile_backend: str | None = None,
) -> Variant:
    model = native_model(config, state)
    if recompute != "none":
        apply_recompute(model, recompute, plan=memory_plan(model))
    if compile_backend is not None:  # train.compile: every transformer block compiled (the warm-up compiles)
        compile_blocks(model, get_model_spec("qwen2_5_vl"), compile_backend)
    with optimization_level_scope(level):  # build_optimizer picks the fused step from level 1 on
        optimizer = build_optimizer(model, OPTIM)
    return Variant(name, model, optimizer, level, [on_device(b) for b in batches])


def hf_variant(name: str, config: Qwen2_5_VLConfig, state: dict, batches: list) -> Variant:
    model = hf_model(config, state)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=OPTIM.lr,
        betas=(OPTIM.beta1, OPTIM.beta2),
        eps=OPTIM.eps,
        weight_decay=OPTIM.weight_decay,
    )
    return Variant(name, model, optimizer, None, [on_device(b) for b in batches])


# --------------------------------------------------------------------------------------------------
# Checks and timing
# --------------------------------------------------------------------------------------------------


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], level: int | None) -> float:
    """fp32 training loss without gradients (``level`` None: HF)."""
    with torch.no_grad(), optimization_level_scope(2 if level is None else level):
        return float(training_loss(model, batch, hf=level is None))


def trained_state(config: Qwen2_5_VLConfig, state: dict, batch: dict, steps: int) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` fp32 OpenSpeed training steps (level 2) on ``batch`` from ``state``."""
    variant = openspeed_variant("trained", config, state, 2, [batch])
    for _ in range(steps):
        variant.step(variant.batches[0], "fp32")
    return {k: v.detach().cpu().clone() for k, v in variant.model.state_dict().items()}


def check_losses(
    config: Qwen2_5_VLConfig, state: dict, batch: dict, pair: list | None, levels: list[int], label: str = "init"
) -> float:
    """Compare OpenSpeed's fp32 losses (each level; the packed pair) with HF's; exit if they differ.

    Returns the largest difference.
    """
    hf, native = hf_model(config, state), native_model(config, state)
    batch = on_device(batch)
    ref = forward_loss(hf, batch, None)
    print(f"loss check (fp32, {label} weights, equal batch): HF = {ref:.6f}", flush=True)
    checks = [(f"OpenSpeed level {lv}", forward_loss(native, batch, lv), ref) for lv in levels]
    if pair is not None:
        ref_pair = forward_loss(hf, on_device(collator(False)(pair)), None)
        print(f"loss check (fp32, variable-length pair, HF padded): HF = {ref_pair:.6f}", flush=True)
        checks.append(
            ("OpenSpeed level 2 packed", forward_loss(native, on_device(collator(True)(pair)), 2), ref_pair)
        )
    worst = 0.0
    for name, loss, reference in checks:
        diff = abs(loss - reference)
        worst = max(worst, diff)
        print(f"  {name} = {loss:.6f}  |diff| = {diff:.2e}", flush=True)
    if worst > LOSS_TOLERANCE:
        raise SystemExit(f"error: OpenSpeed and HF losses differ by {worst:.2e} > {LOSS_TOLERANCE:g}")
    print(f"  largest |diff| {worst:.2e} <= {LOSS_TOLERANCE:g}: both sides compute the same loss", flush=True)
    return worst


def run_round_robin(variants: list[Variant], precision: str, steps: int) -> list[float]:
    """Time ``steps`` passes over every variant's batches, alternating the variants step by step.

    First one warm-up step of each variant (its first batch, not recorded). Then round ``r`` runs batch
    ``r % len(batches)`` of every variant (all variants have the same number of batches), in an order
    rotated every round. Returns the 1-minute load average sampled after each round.
    """
    for variant in variants:
        variant.step(variant.batches[0], precision)
        variant.times = [[] for _ in variant.batches]
    n = len(variants[0].batches)
    loads = []
    for r in range(n * steps):
        shift = r % len(variants)
        last = {}
        for variant in variants[shift:] + variants[:shift]:
            last[variant.name] = variant.step(variant.batches[r % n], precision)
            variant.times[r % n].append(last[variant.name])
        loads.append(load_1min())
        done = ", ".join(f"{v.name} {last[v.name]:.2f}s" for v in variants)
        print(f"  [{precision}] round {r + 1}/{n * steps} (load {loads[-1]:.2f}): {done}", flush=True)
    return loads


def measured_peak(dtype: torch.dtype) -> float:
    """``Accelerator.peak_flops(dtype)`` measured now, through a private cache directory.

    The shared cache may hold a figure taken under other people's load (or this run's would be
    written there); a fresh measurement at the start and end of each table is taken instead.
    """
    previous = os.environ.get("OPENSPEED_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENSPEED_CACHE"] = tmp
        try:
            return get_accelerator().peak_flops(dtype)
        finally:
            if previous is None:
                os.environ.pop("OPENSPEED_CACHE", None)
            else:
                os.environ["OPENSPEED_CACHE"] = previous


@dataclass
class Row:
    name: str
    step_s: float  # sum over the variant's batches of the median step time
    tokens: int  # real tokens over the variant's batches
    computed: int  # tokens computed including padding
    flops: float
    saved: int


def summarize(variant: Variant, config: Qwen2_5_VLConfig, saved: int) -> Row:
    spec = get_model_spec("qwen2_5_vl")
    step = sum(statistics.median(t) for t in variant.times)
    tokens = sum(VLMTask.count_tokens(b) for b in variant.batches)
    computed = sum(b["input_ids"].numel() for b in variant.batches)
    flops = sum(VLMTask.batch_flops(spec, config, b) for b in variant.batches)
    return Row(variant.name, step, tokens, computed, flops, saved)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[Row], peak: float, useful: bool) -> None:
    """A Markdown table; ratios are to the first row (HF)."""
    reference = rows[0]
    print(f"\n{title}\n")
    print(
        f"| variant | tokens (computed) | step s | {'useful tokens/s' if useful else 'tokens/s'} | vs HF "
        "| TFLOPS | MFU | saved for backward MiB | saved vs HF |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref_rate = reference.tokens / reference.step_s
    for row in rows:
        rate = row.tokens / row.step_s
        flops_per_s = row.flops / row.step_s
        saved = f"{row.saved / MiB:.1f} | {row.saved / reference.saved:.2f}x" if reference.saved else "- | -"
        print(
            f"| {row.name} | {row.tokens} ({row.computed}) | {row.step_s:.2f} | {rate:.0f} "
            f"| {rate / ref_rate:.2f}x | {flops_per_s / 1e12:.3f} | {100 * flops_per_s / peak:.1f}% | {saved} |",
            flush=True,
        )


def run_table(
    title: str,
    variants: list[Variant],
    config: Qwen2_5_VLConfig,
    precision: str,
    steps: int,
    useful: bool,
    measure_saved: bool = True,
) -> list[Row]:
    """Saved bytes, the round robin and the peak (best of a measurement before and after); prints the table."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak_before = measured_peak(dtype)
    saved = {v.name: v.saved_bytes(precision) if measure_saved else 0 for v in variants}
    loads = run_round_robin(variants, precision, steps)
    peak_after = measured_peak(dtype)
    peak = max(peak_before, peak_after)
    rows = [summarize(v, config, saved[v.name]) for v in variants]
    print_table(
        f"{title} — median of {steps} steps per batch after 1 warm-up; 1-min load during the rounds "
        f"{min(loads):.2f}..{max(loads):.2f} (median {statistics.median(loads):.2f}); {precision} matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s (measured {peak_before / 1e9:.0f} before, {peak_after / 1e9:.0f} after)",
        rows,
        peak,
        useful,
    )
    return rows


def equal_variants(
    config: Qwen2_5_VLConfig, state: dict, batch: dict, levels: list[int], with_recompute: bool
) -> list[Variant]:
    """HF, OpenSpeed at each level and (optionally) level 2 with full recompute, on the equal batch."""
    variants = [hf_variant("HF transformers + torch AdamW", config, state, [batch])]
    variants += [openspeed_variant(f"OpenSpeed level {lv}", config, state, lv, [batch]) for lv in levels]
    variants.append(openspeed_variant(LEVEL2_COMPILED, config, state, 2, [batch], compile_backend="inductor"))
    if with_recompute:
        name = "OpenSpeed level 2 + recompute=full"
        variants.append(openspeed_variant(name, config, state, 2, [batch], "full"))
    return variants


def variable_variants(config: Qwen2_5_VLConfig, state: dict, pairs: list) -> list[Variant]:
    """HF padded, OpenSpeed level 2 padded and packed, over the same pairs of samples."""
    padded = [collator(False)(pair) for pair in pairs]
    packed = [collator(True)(pair) for pair in pairs]
    return [
        hf_variant("HF transformers + torch AdamW, padded", config, state, padded),
        openspeed_variant("OpenSpeed level 2, padded", config, state, 2, padded),
        openspeed_variant("OpenSpeed level 2, packed", config, state, 2, packed),
    ]


# Op categories of the --profile breakdown, by ATen op name.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul")
COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat")


def _category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (SDPA kernels)"
    if name in COPY_OPS:
        return "copies / casts"
    if "adam" in name:
        return "fused AdamW kernel"
    return "everything else (elementwise, norms, softmax, indexing, ...)"


def profile_steps(variants: list[Variant], precision: str, top: int = 12) -> None:
    """Profile one step of each variant (after a warm-up step): phases, op categories, top matmuls."""
    for variant in variants:
        variant.step(variant.batches[0], precision)
        with profile(activities=get_accelerator().profiler_activities(), record_shapes=True) as prof:
            seconds = variant.step(variant.batches[0], precision)
        events = prof.key_averages()
        print(f"\n### {variant.name}, {precision}: {seconds:.2f} s (profiled step; load {load_averages()})\n")
        phases = [e for e in events if e.key.startswith("phase: ")]
        print("| phase | s |\n|---|---:|")
        for e in phases:
            print(f"| {e.key[7:]} | {e.cpu_time_total / 1e6:.2f} |")
        totals: dict[str, float] = {}
        for e in events:
            if not e.key.startswith("phase: "):
                cat = _category(e.key)
                totals[cat] = totals.get(cat, 0.0) + e.self_cpu_time_total / 1e6
        print("\n| op category (self CPU time) | s |\n|---|---:|")
        for cat, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {sec:.2f} |")
        shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MATMUL_OPS]
        shaped.sort(key=lambda e: -e.self_cpu_time_total)
        print("\n| top matmuls | calls | shapes | s | GFLOP/s |\n|---|---:|---|---:|---:|")
        for e in shaped[:top]:
            flops = _matmul_flops(e.key, e.input_shapes) * e.count
            rate = (
                f"{flops / (e.self_cpu_time_total / 1e6) / 1e9:.0f}"
                if flops and e.self_cpu_time_total
                else "-"
            )
            print(f"| {e.key} | {e.count} | {e.input_shapes} | {e.self_cpu_time_total / 1e6:.2f} | {rate} |")
        ops = sorted(
            (e for e in events if not e.key.startswith("phase: ")), key=lambda e: -e.self_cpu_time_total
        )
        print("\n| top ops (self CPU time) | calls | s |\n|---|---:|---:|")
        for e in ops[:top]:
            print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.2f} |", flush=True)


def _matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one call of a 2-D matmul op from its recorded input shapes (0 when unknown)."""
    try:
        if name in ("aten::mm", "aten::matmul"):
            (m, k), (_, n) = shapes[0], shapes[1]
        elif name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
        elif name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
        else:
            return 0.0
        return 2.0 * m * k * n
    except (ValueError, IndexError, TypeError):
        return 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16, level 2 vs HF, equal batches only")
    parser.add_argument("--shape", choices=("60m", "3b"), default="60m",
                        help="3b: Qwen2.5-VL-3B widths (for a GPU / NPU; see benchmarks/gpu_check.sh)")
    parser.add_argument("--text-layers", type=int, default=None, help="with --shape 3b: decoder layers")
    parser.add_argument("--vision-depth", type=int, default=None, help="with --shape 3b: vision blocks")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch after 1 warm-up (>= 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "both"), default=None, help="default: both (quick: bf16)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead of the tables: profile one step of each variant"
    )
    args = parser.parse_args(argv)
    if args.steps < 3:
        raise ConfigError(f"--steps: at least 3 timed steps are needed for a median, got {args.steps}")
    threads = args.threads or len(os.sched_getaffinity(0))
    if threads < 1:
        raise ConfigError(f"--threads: must be positive, got {threads}")
    if args.quick and args.precision not in (None, "bf16"):
        raise ConfigError(f"--quick runs bf16 only, got --precision {args.precision}")
    precisions = ["fp32", "bf16"] if args.precision in (None, "both") and not args.quick else ["bf16"]
    if args.precision == "fp32":
        precisions = ["fp32"]
    torch.set_num_threads(threads)
    acc = get_accelerator()
    acc.configure_math()

    command = " ".join(["python -m benchmarks.train_throughput", *(sys.argv[1:] if argv is None else argv)])
    print("# Training throughput: OpenSpeed vs Hugging Face transformers\n")
    print(
        f"`{command}` on {acc.device_type} ({cpu_name()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), commit {commit()}, "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}, load average at start {load_averages()}",
        flush=True,
    )
    config = benchmark_config(args.shape, args.text_layers, args.vision_depth)
    state = reference_state(config)
    batch = equal_batch(config)
    pairs = [] if args.quick else variable_pairs(config)
    print(
        f"model: {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters; equal batch {BATCH} x "
        f"{SEQ_LEN} tokens; one {IMAGE_GRID[1] * 14}x{IMAGE_GRID[2] * 14} image per sample",
        flush=True,
    )
    if pairs:
        lengths = [[int(s["input_ids"].numel()) for s in pair] for pair in pairs]
        real = sum(map(sum, lengths))
        padded = sum(BATCH * max(pair) for pair in lengths)
        print(
            f"variable-length pairs (token counts): {lengths}; {real} real tokens, {padded} when each pair "
            f"is padded to its longer sample ({padded / real:.2f}x)",
            flush=True,
        )

    # Same thing computed? fp32 losses of the OpenSpeed levels (and the packed row) against HF's, at the
    # random init and on weights trained a few steps (where a wrong gradient would have moved them apart).
    check_levels = [2] if args.quick else [0, 1, 2]
    check_losses(config, state, batch, pairs[0] if pairs else None, check_levels)
    trained = trained_state(config, state, batch, TRAINED_STEPS)
    check_losses(config, trained, batch, pairs[0] if pairs else None, check_levels,
                 label=f"{TRAINED_STEPS}-step trained")

    if "bf16" in precisions:
        rate = measured_peak(torch.bfloat16) / 1e9
        if rate < BF16_USABLE_GFLOPS:
            print(f"bf16 rows skipped: this {acc.device_type} multiplies bf16 matrices at {rate:.1f} GFLOP/s "
                  f"(< {BF16_USABLE_GFLOPS:g}; it has no native bf16 matmul)", flush=True)
            precisions = [p for p in precisions if p != "bf16"]
            if args.quick:
                print("openspeed/hf bf16 tokens/s: skipped")
                return

    levels = [] if args.quick else [0, 1, 2]
    if args.profile:
        for precision in precisions:
            print(f"\n## Where the time goes: one profiled step, equal batch, {precision}")
            profile_steps(equal_variants(config, state, batch, levels, with_recompute=False), precision)
            if pairs:
                # The pair with the most padding: what packing removes and what the padded paths cost.
                worst = max(
                    pairs,
                    key=lambda p: (
                        BATCH * max(len(s["input_ids"]) for s in p) - sum(len(s["input_ids"]) for s in p)
                    ),
                )
                lengths = [len(s["input_ids"]) for s in worst]
                print(
                    f"\n## Where the time goes: one profiled step, variable-length pair {lengths}, {precision}"
                )
                profile_steps(variable_variants(config, state, [worst]), precision)
        return
    ratios: dict[str, float] = {}
    for precision in precisions:
        rows = run_table(
            f"Equal batches, {precision}",
            equal_variants(config, state, batch, levels, with_recompute=not args.quick),
            config,
            precision,
            args.steps,
            useful=False,
            measure_saved=not args.quick,
        )
        hf_rate = rows[0].tokens / rows[0].step_s
        for row in rows[1:]:
            if row.name in (LEVEL2, LEVEL2_COMPILED):
                ratios[precision + ("" if row.name == LEVEL2_COMPILED else " uncompiled")] = (
                    row.tokens / row.step_s / hf_rate)
        if pairs:
            rows = run_table(
                f"Variable-length pairs, {precision} (useful = non-padding tokens)",
                variable_variants(config, state, pairs),
                config,
                precision,
                args.steps,
                useful=True,
            )
            packed = rows[2].tokens / rows[2].step_s
            ratios[f"{precision} packed"] = packed / (rows[0].tokens / rows[0].step_s)
    if acc.device_type != "cpu":
        print(f"peak device memory: {acc.max_memory_allocated() / 2**30:.1f} GiB (all variants resident)")
    print()
    # bf16 (level 2 compiled) last: the headline (and --quick's only) figure.
    for name, ratio in sorted(ratios.items(), key=lambda kv: (kv[0].startswith("bf16"), kv[0] == "bf16")):
        print(f"openspeed/hf {name} {'useful ' if 'packed' in name else ''}tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    try:
        main()
    except OpenSpeedError as exc:
        raise SystemExit(f"error: {exc}") from None
