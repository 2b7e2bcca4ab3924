"""Reference vs fast path of every op in ``openspeed/ops``: time and bytes kept for backward.

Run ``python -m benchmarks.ops`` (``--quick`` for smaller shapes and fewer repeats, ``--only NAME``
for one op). For each op and dtype it prints a Markdown table row with the median forward and
forward+backward times of the reference and the fast path (repeats interleaved side by side, so both
see the same machine load), the speed-up (reference / fast) and the bytes saved for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` once per untyped storage; the last column says how
much of that is the op's own inputs (activations or parameters that exist anyway).

By default it runs one intra-op thread and times with the process CPU clock (user + system time,
page faults of fresh allocations included): on a shared machine wall-clock times of the same run
varied 2x with other people's load, CPU time by a few percent. ``--threads N`` (N > 1) switches
to wall-clock time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.machine import commit, cpu_name
from openspeed.ops import adamw, cross_entropy, rms_norm, rope, swiglu

MiB = 1024 * 1024


@dataclass
class Case:
    """One op at one shape and dtype: ``make()`` returns fresh inputs, ``run(inputs, fast)`` the loss."""

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], list[torch.Tensor]]
    run: Callable[[list[torch.Tensor], bool], torch.Tensor]


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_bytes(case: Case, fast: bool) -> tuple[int, int]:
    """(bytes of all distinct storages saved for backward, the part that belongs to the op's inputs)."""
    inputs = case.make()
    input_keys = {_storage_key(t) for t in inputs}
    seen: dict[tuple[int, int], bool] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        seen[key] = key in input_keys
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.run(inputs, fast)
    del out
    total = sum(nbytes for (_, nbytes) in seen)
    own = sum(nbytes for (_, nbytes), is_input in seen.items() if is_input)
    return total, own


def _grads_of(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in inputs if t.requires_grad]


# Set by main(): process CPU time with one thread, wall-clock time with several.
clock = time.process_time


def _time_once(case: Case, inputs: list[torch.Tensor], fast: bool) -> tuple[float, float]:
    start = clock()
    out = case.run(inputs, fast)
    mid = clock()
    leaves = _grads_of(inputs)
    if leaves:
        torch.autograd.grad(out, leaves, torch.ones_like(out) if out.dim() else None)
    end = clock()
    return mid - start, end - start


def time_case(case: Case, repeats: int) -> dict[str, float]:
    """Median forward and forward+backward seconds, reference and fast interleaved."""
    inputs = case.make()
    for fast in (False, True):  # warm-up (allocator, lazy inits)
        _time_once(case, inputs, fast)
    samples: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for fast in order:
            samples[fast].append(_time_once(case, inputs, fast))
    return {
        "ref_fwd": statistics.median(s[0] for s in samples[False]),
        "fast_fwd": statistics.median(s[0] for s in samples[True]),
        "ref_total": statistics.median(s[1] for s in samples[False]),
        "fast_total": statistics.median(s[1] for s in samples[True]),
    }


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def rms_norm_cases(tokens: int, hidden: int, dtypes) -> list[Case]:
    return [
        Case(
            "rms_norm",
            f"x ({tokens}, {hidden})",
            dtype,
            lambda dtype=dtype: [_randn(tokens, hidden, dtype=dtype), _randn(hidden, dtype=dtype)],
            lambda t, fast: rms_norm.rms_norm(t[0], t[1], 1e-6, fast=fast),
        )
        for dtype in dtypes
    ]


def swiglu_cases(tokens: int, inter: int, dtypes) -> list[Case]:
    return [
        Case(
            "swiglu",
            f"gate/up ({tokens}, {inter})",
            dtype,
            lambda dtype=dtype: [_randn(tokens, inter, dtype=dtype), _randn(tokens, inter, dtype=dtype)],
            lambda t, fast: swiglu.swiglu(t[0], t[1], fast=fast),
        )
        for dtype in dtypes
    ]


def rope_cases(tokens: int, heads: int, kv_heads: int, head_dim: int, dtypes) -> list[Case]:
    cases = []
    section = (head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16)
    inv_freq = rope.rope_inv_freq(head_dim, 1e6)
    positions = torch.randint(0, 64, (3, 1, tokens))
    for dtype in dtypes:
        cos, sin = rope.mrope_cos_sin(inv_freq, positions, section, dtype)

        def make(dtype=dtype):
            q = torch.randn(1, tokens, heads, head_dim).to(dtype).transpose(1, 2).requires_grad_()
            k = torch.randn(1, tokens, kv_heads, head_dim).to(dtype).transpose(1, 2).requires_grad_()
            return [q, k]

        def run_mrope(t, fast, cos=cos, sin=sin):
            q, k = rope.apply_rotary(t[0], t[1], cos, sin, fast=fast)
            return q.sum() + k.sum()

        shape = f"q (1, {heads}, {tokens}, {head_dim}), k {kv_heads} heads"
        cases.append(Case("M-RoPE (text)", shape, dtype, make, run_mrope))

        frames, height, width = 8, 16, tokens // 128
        video_cos, video_sin = rope.video_rope_cos_sin(head_dim, (frames, height, width))
        rotation = rope.video_rope_rotation(video_cos, video_sin)  # built once per grid, shared by layers
        video_len = frames * height * width

        def run_video(t, fast, cos=video_cos, sin=video_sin, rotation=rotation):
            # q and k of one attention layer; the fast path shares the prebuilt complex table
            if fast:
                q, k = (rope.apply_video_rotary(x, rotation=rotation) for x in t)
            else:
                q, k = (rope.apply_video_rotary(x, cos, sin, fast=False) for x in t)
            return q.sum() + k.sum()

        def make_video(dtype=dtype, video_len=video_len):
            return [_randn(1, video_len, heads, head_dim, dtype=dtype) for _ in range(2)]

        cases.append(
            Case("3-D video RoPE", f"q/k (1, {video_len}, {heads}, {head_dim})", dtype, make_video, run_video)
        )
    # The vision tower rotates its fp32-computed tables on fp32 activations.
    vis_cos, vis_sin = torch.randn(tokens, head_dim), torch.randn(tokens, head_dim)

    def run_vision(t, fast):
        q, k = rope.apply_vision_rotary(t[0], t[1], vis_cos, vis_sin, fast=fast)
        return q.sum() + k.sum()

    cases.append(
        Case(
            "vision RoPE",
            f"q/k ({tokens}, {heads}, {head_dim})",
            torch.float32,
            lambda: [_randn(tokens, heads, head_dim, dtype=torch.float32) for _ in range(2)],
            run_vision,
        )
    )
    return cases


def cross_entropy_cases(tokens: int, hidden: int, vocab: int, dtypes, recompute: bool) -> list[Case]:
    cases = []
    for dtype in dtypes:

        def make(dtype=dtype):
            targets = torch.randint(0, vocab, (tokens,))
            targets[::5] = cross_entropy.IGNORE_INDEX
            return [
                _randn(tokens, hidden, dtype=dtype),
                _randn(vocab, hidden, dtype=dtype, scale=0.02),
                targets,
            ]

        def run(t, fast):
            return cross_entropy.fused_linear_cross_entropy(
                t[0], t[1], t[2], divisor=tokens, fast=fast, recompute=recompute
            )

        name = "linear+CE (recompute)" if recompute else "linear+CE (stash)"
        cases.append(Case(name, f"h ({tokens}, {hidden}), W ({vocab}, {hidden})", dtype, make, run))
    return cases


def time_adamw(num_params: int, repeats: int, ema_decay: float = 0.999) -> tuple[str, dict[str, float]]:
    """Median seconds per optimizer step (with EMA) for a set of transformer-like parameter shapes."""
    torch.manual_seed(0)
    shapes = []
    while sum(torch.Size(s).numel() for s in shapes) < num_params:
        shapes += [(512, 512)] * 4 + [(1408, 512), (1408, 512), (512, 1408), (512,), (512,)]
    optimizers = {}
    for fast in (False, True):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        optimizers[fast] = adamw.AdamWEMA(params, lr=1e-3, weight_decay=0.1, ema_decay=ema_decay, fast=fast)
    for opt in optimizers.values():
        opt.step()
    samples: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for fast in (False, True) if i % 2 == 0 else (True, False):
            start = clock()
            optimizers[fast].step()
            samples[fast].append(clock() - start)
    total = sum(torch.Size(s).numel() for s in shapes)
    return (
        f"{len(shapes)} tensors, {total / 1e6:.1f}M params",
        {"ref_total": statistics.median(samples[False]), "fast_total": statistics.median(samples[True])},
    )


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _header() -> str:
    clock_name = "process CPU time" if clock is time.process_time else "wall-clock time"
    return (
        f"torch {torch.__version__}, {cpu_name()}, {torch.get_num_threads()} thread(s), {clock_name}, "
        f"commit {commit()}"
    )


TABLE_HEAD = (
    "| op | shape | dtype | fwd ref ms | fwd fast ms | fwd+bwd ref ms | fwd+bwd fast ms | speed-up "
    "| saved ref MiB | saved fast MiB | of which inputs MiB (ref / fast) |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def report_case(case: Case, repeats: int) -> str:
    t = time_case(case, repeats)
    ref_total, ref_own = saved_bytes(case, fast=False)
    fast_total, fast_own = saved_bytes(case, fast=True)
    return (
        f"| {case.op} | {case.shape} | {_dtype_name(case.dtype)} | {_ms(t['ref_fwd'])} | {_ms(t['fast_fwd'])} "
        f"| {_ms(t['ref_total'])} | {_ms(t['fast_total'])} | {t['ref_total'] / t['fast_total']:.2f}x "
        f"| {ref_total / MiB:.2f} | {fast_total / MiB:.2f} | {ref_own / MiB:.2f} / {fast_own / MiB:.2f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per path (default 9, quick 3)"
    )
    parser.add_argument("--only", default=None, help="one of rms_norm, swiglu, rope, ce, adamw")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: CPU-time clock)")
    args = parser.parse_args(argv)
    global clock
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    repeats = args.repeats or (3 if args.quick else 9)
    tokens, hidden, inter, vocab = (256, 128, 352, 4000) if args.quick else (2048, 512, 1408, 32000)
    heads, kv_heads, head_dim = hidden // 64, max(1, hidden // 256), 64
    both = (torch.float32, torch.bfloat16)

    def want(name: str) -> bool:
        return args.only in (None, name)

    print(f"# openspeed.ops: reference vs fast path\n\n{_header()}\n")
    command = " ".join(["python -m benchmarks.ops", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"`{command}`; times are medians of {repeats} interleaved repeats; speed-up = fwd+bwd ref / fwd+bwd fast.\n"
    )
    groups = []
    if want("rms_norm"):
        groups.append(("RMSNorm", rms_norm_cases(tokens, hidden, both)))
    if want("swiglu"):
        groups.append(("SwiGLU", swiglu_cases(tokens, inter, both)))
    if want("rope"):
        groups.append(("Rotary embeddings", rope_cases(tokens, heads, kv_heads, head_dim, both)))
    if want("ce"):
        ce = cross_entropy_cases(tokens, hidden, vocab, (torch.float32,), recompute=False)
        ce += cross_entropy_cases(tokens, hidden, vocab, (torch.float32,), recompute=True)
        ce += cross_entropy_cases(tokens // 4, hidden, vocab, (torch.bfloat16,), recompute=False)
        groups.append(("Fused linear + cross-entropy", ce))
    for title, cases in groups:
        print(f"## {title}\n\n{TABLE_HEAD}")
        for case in cases:
            print(report_case(case, repeats), flush=True)
        print()
    if want("adamw"):
        shape, t = time_adamw(2_000_000 if args.quick else 20_000_000, repeats)
        print("## AdamW + EMA (one optimizer step)\n")
        print("| params | ref ms | fast ms | speed-up |\n|---|---:|---:|---:|")
        print(
            f"| {shape} | {_ms(t['ref_total'])} | {_ms(t['fast_total'])} | {t['ref_total'] / t['fast_total']:.2f}x |\n"
        )


if __name__ == "__main__":
    main()
