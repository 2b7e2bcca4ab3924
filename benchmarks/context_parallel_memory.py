"""Activation memory per rank under context parallelism, and the longest sequence a budget allows.

Run: ``python -m benchmarks.context_parallel_memory`` (options: ``--seqs``, ``--budgets-mib``,
``--optimization-level``, and the model sizes ``--hidden``, ``--layers``, ``--heads``, ``--kv-heads``,
``--intermediate``, ``--vocab``).

What is measured. The bytes autograd saves for backward during one training forward (loss included), per
rank, as :class:`openspeed.memory.SavedBytesMeter` counts them: every saved tensor's storage once, parameters
and their views left out. That is the activation memory a step holds at its peak between forward and
backward; parameters, gradients and optimizer state come on top and do not depend on the sequence length
(FSDP2 shards them over ``dp_shard x cp``, tensor parallel over ``tp``).

The model. The language model of a native :class:`~openspeed.models.qwen2_5_vl.Qwen2_5_VLModel` (by
default hidden 256, 4 layers, 8 query / 2 key-value heads, MLP 1024, vocabulary 4096; fp32; the vision
tower is built tiny and never runs: batches are text only). One row of ``S`` random tokens with its
all-ones padding mask and ``labels = input_ids``, called as the trainer calls it: ``num_items_in_batch``
the global target count, only the loss asked for (``return_logits=False``), at the trainer's default
``train.optimization_level`` 2 (fused norm / SwiGLU / rotary ops, and the loss computed from the hidden
states in chunks, so the full logits are never kept; ``--optimization-level 0`` measures the reference
ops with full logits).

The layouts. Each cp size runs in its own spawned gloo world on the CPU, one thread per process: cp = 1 is
the plain model (no cp), cp = 2 Ulysses and ring, cp = 4 Ulysses, ring and hybrid (Ulysses 2 x ring 2). Each
algorithm gets a fresh model with context parallel applied exactly as training applies it
(``apply_context_parallel(model, ContextParallel.from_group(...))``: the decoder stack's inputs sharded by
module hooks, attention routed to the cp algorithm, targets shifted on the whole sequence and sharded).
The figure of a layout is the largest over its ranks (gloo ``MAX``), so every rank runs the same search.

(a) Saved bytes per rank at each ``--seqs`` length (multiples of every layout's sequence multiple: the
default 512 ... 4096 are), with the least-squares line ``bytes = a + b * S`` through those points and the
largest deviation of a measurement from it.

(b) For each budget (``--budgets-mib``, default 64 and 256 MiB of saved bytes per rank), the longest
sequence ``S`` that is a multiple of the layout's ``seq_multiple`` (1 without cp, ``c`` for Ulysses, ``2c``
for ring and hybrid) and whose forward saves at most the budget on every rank. Found by measurement: the
line's prediction is measured, then lengths above it in growing steps ``m, 2m, 4m, ...`` until one does not
fit (or, if it does not fit, below it until one does); the bracket is bisected on multiples of ``m``. The
answer ``S`` fits and ``S + m`` was measured not to. Since the saved bytes are linear in ``S`` here (the
attention kernels save O(S) — q, k, v, output and log-sum-exp — not the S x S probabilities), the
prediction is normally right and two measurements suffice; the table lists how many were taken. The
ratio column divides by the cp = 1 answer for the same budget.

Saved bytes per token are ``b``: about ``1/c`` of the cp = 1 slope, plus what every rank keeps of the whole
sequence (the token ids the embedding saves; under cp the embedding and the M-RoPE positions are computed
on the whole sequence before the split). ``a`` holds what does not grow with ``S`` (at level 2 the chunked
loss keeps one vocabulary x hidden fp32 tensor). Ulysses ranks hold their heads of the whole sequence during
attention, the same bytes as the local q, k, v, except that GQA key/value heads are duplicated when there
are fewer of them than Ulysses ranks (2 kv heads on 4 ranks here). Ulysses also keeps one more copy of
the attention output per layer (``hidden`` values per local token): its all-to-all returns the output
contiguous as (batch, heads, seq, dim), so the model's ``transpose(1, 2).reshape`` before ``o_proj`` copies
and ``o_proj`` saves the copy, where the SDPA and ring outputs are laid out so that it is a view.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.machine import commit

MIB = 2**20
# cp size -> [(algorithm, ulysses degree)]; cp = 1 is the plain model.
LAYOUTS: dict[int, list[tuple[str, int | None]]] = {
    1: [("none", None)],
    2: [("ulysses", None), ("ring", None)],
    4: [("ulysses", None), ("ring", None), ("hybrid", 2)],
}


def build_config(args: argparse.Namespace):
    """A Qwen2.5-VL config: the text model of ``args``, a one-block vision tower that stays unused."""
    from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig

    head_dim = args.hidden // args.heads
    # M-RoPE sections in Qwen's proportions (16, 24, 24 of 64 rotary pairs): 1/4, 3/8, 3/8.
    temporal = head_dim // 8
    height = (head_dim // 2 - temporal) // 2
    text = TextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        mrope_section=(temporal, height, head_dim // 2 - temporal - height),
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = VisionConfig(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=args.hidden,
        fullatt_block_indexes=(0,),
    )
    top = args.vocab - 1  # special ids at the top of the vocabulary; the random text stays below them
    return Qwen2_5_VLConfig(
        vision=vision, text=text, image_token_id=top, video_token_id=top - 1,
        vision_start_token_id=top - 2, vision_end_token_id=top - 3,
    )


def _fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``bytes = a + b * seq``."""
    n = len(points)
    mean_s = sum(s for s, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((s - mean_s) ** 2 for s, _ in points)
    slope = sum((s - mean_s) * (y - mean_y) for s, y in points) / var
    return mean_y - slope * mean_s, slope


def longest_fitting(
    saved: Callable[[int], int], multiple: int, budget: int, line: tuple[float, float]
) -> tuple[int, int, int]:
    """The longest multiple of ``multiple`` whose ``saved(seq)`` is at most ``budget``, by measurement.

    Starts at the line's prediction, gallops up or down to a bracket (one length that fits, the next
    multiple above it measured not to), bisecting in between. Returns ``(seq, saved(seq), measurements)``;
    ``seq`` is 0 when not even ``multiple`` fits. Assumes ``saved`` grows with ``seq``.
    """
    cache: dict[int, int] = {}

    def fits(seq: int) -> bool:
        if seq not in cache:
            cache[seq] = saved(seq)
        return cache[seq] <= budget

    a, b = line
    guess = max(multiple, int((budget - a) / b) // multiple * multiple)
    if fits(guess):
        low, step = guess, multiple
        while fits(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high, step = guess, multiple
        while high - step >= multiple and not fits(high - step):
            high, step = high - step, step * 2
        if high - step < multiple:
            if not fits(multiple):
                return 0, cache[multiple], len(cache)
            low = multiple
        else:
            low = high - step
    while high - low > multiple:
        middle = low + (high - low) // multiple // 2 * multiple
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, cache[low], len(cache)


def set_optimization_level(level: int) -> str:
    """Use op level ``level`` in this process, as the trainer does from ``train.optimization_level``;
    returns how the header names it."""
    try:
        from openspeed.ops.level import set_optimization_level as set_level
    except ImportError:  # a checkout from before selectable op implementations: one set of ops
        return "reference ops"
    set_level(level)
    return f"optimization level {level}"


def _saved_bytes(model, seq: int, args: argparse.Namespace) -> int:
    """Bytes saved for backward by one training forward of ``seq`` tokens (largest over the ranks)."""
    import torch.distributed as dist

    from openspeed.memory import SavedBytesMeter

    gen = torch.Generator().manual_seed(seq)
    input_ids = torch.randint(3, args.vocab - 4, (1, seq), generator=gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "num_items_in_batch": seq - 1,
    }
    if "return_logits" in inspect.signature(model.forward).parameters:
        batch["return_logits"] = False  # as VLMTask.loss asks: the loss only (chunked at level 2)
    with SavedBytesMeter(exclude=model) as meter:
        loss = model(**batch).loss
    del loss  # the graph (and everything it saved) goes with it
    value = torch.tensor([meter.report.device], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def _measure_layout(model, multiple: int, args: argparse.Namespace) -> dict:
    """Table (a)'s points and line, and table (b)'s longest sequence per budget, for one model."""

    def saved(seq: int) -> int:
        return _saved_bytes(model, seq, args)

    points = [(seq, saved(seq)) for seq in args.seqs]
    line = _fit_line(points)
    deviation = max(abs(y - (line[0] + line[1] * s)) / y for s, y in points)
    budgets = {}
    for budget in args.budgets_mib:
        seq, used, measured = longest_fitting(saved, multiple, budget * MIB, line)
        budgets[str(budget)] = {"seq": seq, "bytes": used, "measurements": measured}
    return {"points": points, "line": line, "deviation": deviation, "budgets": budgets}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    import torch.distributed as dist

    from openspeed.distributed.context_parallel import ContextParallel
    from openspeed.models.qwen2_5_vl import Qwen2_5_VLModel
    from openspeed.models.qwen2_5_vl.parallelize import apply_context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_optimization_level(args.optimization_level)
        config = build_config(args)
        rows = []
        for algo, ulysses in LAYOUTS[world]:
            start = time.perf_counter()
            torch.manual_seed(0)
            model = Qwen2_5_VLModel(config).train()
            multiple, degree = 1, 1
            if world > 1:
                cp = ContextParallel.from_group(dist.group.WORLD, algo, ulysses)
                apply_context_parallel(model, cp)
                multiple, degree = cp.seq_multiple, cp.ulysses_size
            row = {"algo": algo, "cp": world, "ulysses": degree, "multiple": multiple}
            row.update(_measure_layout(model, multiple, args))
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            row["seconds"] = float(elapsed)
            rows.append(row)
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(rows, fh)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, port, args, out_path), nprocs=world, join=True)
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)


def _layout_name(row: dict) -> str:
    if row["cp"] == 1:
        return "no cp"
    ring = row["cp"] // row["ulysses"]
    return f"{row['algo']} (U{row['ulysses']} x R{ring})"


def _print_tables(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]  # cp = 1
    print("(a) Saved bytes per rank of one training forward (MiB), largest over the ranks; "
          "line = least-squares a + b*S through the measured points.\n")
    head = " | ".join(f"S={s}" for s in args.seqs)
    print(
        f"| layout | cp | seq multiple | {head} | a (MiB) | b (KiB/token) | b / b(no cp) "
        "| max dev. from line |"
    )
    print("|---|---|---|" + "---|" * len(args.seqs) + "---|---|---|---|")
    for row in rows:
        cells = " | ".join(f"{y / MIB:.2f}" for _, y in row["points"])
        a, b = row["line"]
        print(
            f"| {_layout_name(row)} | {row['cp']} | {row['multiple']} | {cells} | {a / MIB:.2f} "
            f"| {b / 1024:.2f} | {b / base['line'][1]:.3f} | {row['deviation']:.1e} |"
        )
    print("\n(b) Longest sequence whose forward saves at most the budget per rank (a multiple of the seq "
          "multiple; the next multiple was measured over budget); x = ratio to no cp.\n")
    cols = " | ".join(f"{b} MiB: longest S | x" for b in args.budgets_mib)
    print(f"| layout | cp | {cols} | measurements | time (s) |")
    print("|---|---|" + "---|---|" * len(args.budgets_mib) + "---|---|")
    for row in rows:
        cells, counts = [], []
        for budget in args.budgets_mib:
            got = row["budgets"][str(budget)]
            ref = base["budgets"][str(budget)]["seq"]
            ratio = f"{got['seq'] / ref:.2f}" if ref else "-"
            cells.append(f"{got['seq']} ({got['bytes'] / MIB:.1f} MiB) | {ratio}")
            counts.append(str(got["measurements"]))
        print(
            f"| {_layout_name(row)} | {row['cp']} | {' | '.join(cells)} | {' + '.join(counts)} "
            f"| {row['seconds']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--optimization-level", type=int, choices=(0, 1, 2), default=2,
                        help="train.optimization_level of the measured ops (the trainer's default: 2)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    if len(set(args.seqs)) < 2:
        parser.error("--seqs needs at least two different lengths (for the line)")
    for seq in args.seqs:
        if seq % (2 * max(LAYOUTS)):
            parser.error(f"--seqs: {seq} is not a multiple of {2 * max(LAYOUTS)} (so every layout splits it)")

    start = time.perf_counter()
    rows = [row for world in LAYOUTS for row in _spawn(world, args)]
    total = time.perf_counter() - start
    params = (
        f"hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} q/kv heads, "
        f"MLP {args.intermediate}, vocab {args.vocab}"
    )
    level = set_optimization_level(args.optimization_level)
    print(
        f"Saved-for-backward bytes per rank, Qwen2.5-VL language model ({params}), fp32, batch 1, text only, "
        f"{level}; one training forward with the loss.\n"
        f"Host: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, commit {commit()}, "
        f"gloo, one thread per process; command: python -m benchmarks.context_parallel_memory "
        f"--seqs {' '.join(map(str, args.seqs))} --budgets-mib {' '.join(map(str, args.budgets_mib))} "
        f"--optimization-level {args.optimization_level}; "
        f"{total:.0f} s in all.\n"
    )
    _print_tables(rows, args)


if __name__ == "__main__":
    main()
