"""Bytes kept for backward under each memory saver, and optimizer-state bytes, against Hugging Face.

Run ``python -m benchmarks.memory [--precision fp32|bf16|both] [--threads N]``.

The model and the batch are those of :mod:`benchmarks.train_throughput` (the ~60M-parameter
Qwen2.5-VL, seeded weights, 2 samples x 1024 tokens with one 448x448 image each). For each setting a
fresh OpenSpeed model gets the run's ``memory`` section applied exactly as training applies it
(``openspeed.memory.apply.apply_memory_config`` with the model's ``memory_plan``), then one training
forward (the trainer's loss call at ``train.optimization_level`` 2, unless the row says otherwise) runs
under :class:`openspeed.memory.SavedBytesMeter`: every storage autograd keeps for backward is counted
once, parameters excluded (bf16 weight copies made by autocast are included, on both sides). Hugging
Face's ``Qwen2_5_VLForConditionalGeneration`` (SDPA attention, the same weights) runs the same batch
with ``labels`` under the same meter, as the reference.

On the CPU the host is the device, so activation offload moves nothing: the meter counts what the
offloaded modules save as *host* bytes, which is what would leave the accelerator's memory on a GPU.

Optimizer state: the bytes resident with the parameters (``optimizer_state_bytes``) after one update
of plain ``torch.optim.AdamW``, of the optimizer ``build_optimizer`` gives at level 2 (the fused
``AdamWEMA`` step), and of :class:`openspeed.memory.OffloadedAdamW` (``memory.offload_optimizer``, with
and without fp32 master weights), all over the same model (gradients set to zeros for the update).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass

import torch

from benchmarks.machine import commit, cpu_name, load_averages
from benchmarks.train_throughput import (
    OPTIM,
    benchmark_config,
    equal_batch,
    hf_model,
    native_model,
    on_device,
    reference_state,
    saved_for_backward,
)
from openspeed.accelerator import get_accelerator
from openspeed.config import MemoryConfig
from openspeed.errors import ConfigError, OpenSpeedError
from openspeed.memory import OffloadedAdamW, optimizer_state_bytes
from openspeed.memory.apply import apply_memory_config
from openspeed.models.qwen2_5_vl.memory_plan import memory_plan
from openspeed.ops.level import optimization_level_scope
from openspeed.training.optim import build_optimizer

MiB = 1024 * 1024


@dataclass
class Setting:
    """One row: a label, the ``memory`` section to apply and the optimization level."""

    label: str
    memory: MemoryConfig
    level: int = 2


def settings() -> list[Setting]:
    """The rows of the saved-bytes table, in order."""
    rows = [
        Setting("level 0 (reference ops, full logits), recompute none", MemoryConfig(), level=0),
        Setting("level 0, recompute norm", MemoryConfig(recompute="norm"), level=0),
    ]
    rows += [
        Setting(f"recompute {m}", MemoryConfig(recompute=m))
        for m in ("none", "norm", "activation", "selective", "full")
    ]
    rows += [
        Setting(
            f"recompute full, recompute_num_layers {n}",
            MemoryConfig(recompute="full", recompute_num_layers=n),
        )
        for n in (1, 2, 4)
    ]
    rows += [
        Setting("offload activations: attention", MemoryConfig(offload_activations=["attention"])),
        Setting("offload activations: layer", MemoryConfig(offload_activations=["layer"])),
    ]
    return rows


def optimizer_rows(config, state) -> list[tuple[str, int, int]]:
    """(label, device bytes, host bytes) of each optimizer's state after one update."""
    model = native_model(config, state)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [("parameters (fp32), for scale", params, 0)]
    candidates = [
        ("torch.optim.AdamW (what HF users run)", lambda: torch.optim.AdamW(model.parameters(), lr=OPTIM.lr)),
        ("build_optimizer at level 2 (fused AdamWEMA)", lambda: build_optimizer(model, OPTIM)),
        (
            "OffloadedAdamW (memory.offload_optimizer)",
            lambda: OffloadedAdamW(model.parameters(), lr=OPTIM.lr),
        ),
        (
            "OffloadedAdamW + fp32 master weights (memory.offload_master_weights)",
            lambda: OffloadedAdamW(model.parameters(), lr=OPTIM.lr, master_weights=True),
        ),
    ]
    for label, make in candidates:
        with optimization_level_scope(2):
            optimizer = make()
            optimizer.step()
        counted = optimizer_state_bytes(optimizer)
        rows.append((label, counted.device, counted.host))
        del optimizer
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if threads < 1:
        raise ConfigError(f"--threads: must be positive, got {threads}")
    torch.set_num_threads(threads)
    acc = get_accelerator()
    acc.configure_math()
    command = " ".join(["python -m benchmarks.memory", *(sys.argv[1:] if argv is None else argv)])
    print("# Memory savers: bytes kept for backward and optimizer state\n")
    print(
        f"`{command}` on {acc.device_type} ({cpu_name()}), torch {torch.__version__}, {threads} thread(s), "
        f"commit {commit()}, {datetime.datetime.now().isoformat(timespec='minutes')}, load {load_averages()}",
        flush=True,
    )
    config = benchmark_config()
    state = reference_state(config)
    batch = on_device(equal_batch(config))
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]

    for precision in precisions:
        hf_device, hf_host = saved_for_backward(hf_model(config, state), batch, None, precision)
        print(f"\n## Saved for backward, one training forward, batch 2 x 1024, {precision}\n")
        print("| setting | device MiB | host MiB | device vs HF |")
        print("|---|---:|---:|---:|")
        print(f"| HF transformers (SDPA) | {hf_device / MiB:.1f} | {hf_host / MiB:.1f} | 1.00x |", flush=True)
        for setting in settings():
            model = native_model(config, state)
            touched = apply_memory_config(model, setting.memory, memory_plan(model))
            device, host = saved_for_backward(model, batch, setting.level, precision)
            print(
                f"| OpenSpeed {setting.label} ({len(touched)} regions) | {device / MiB:.1f} | {host / MiB:.1f} "
                f"| {device / hf_device:.2f}x |",
                flush=True,
            )
            del model

    print("\n## Optimizer state after one update (fp32 parameters)\n")
    print("| optimizer | on device MiB | in host memory MiB |")
    print("|---|---:|---:|")
    for label, device, host in optimizer_rows(config, state):
        print(f"| {label} | {device / MiB:.1f} | {host / MiB:.1f} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except OpenSpeedError as exc:
        raise SystemExit(f"error: {exc}") from None
