"""The training loop of diffusion transformers (Wan2.1): flow matching, optional LoRA and EMA.

Reads like ``trainer.py`` and shares its building blocks: the model is built on the meta device and
parallelised through its spec (tensor parallel, context parallel over the video tokens, FSDP2 over the
data-parallel dims times cp), weights are loaded from the pipeline's ``transformer/`` or initialised
from (seed, name), AdamW with warmup / cosine, global-norm clipping, atomic DCP checkpoints
(``resume=auto``, ``keep_last``), ``metrics.jsonl`` with a progress bar and ``loss.png``, SIGTERM saving
a checkpoint and exiting.

One step: this rank's micro-batches are decoded ahead by the loader (``data.loader.step_batches``);
the step's usable sample count is summed over the data-parallel group; each micro-batch is encoded
(frozen VAE / text encoder, in this thread) and split into groups of equal shapes (buckets), and each
group's loss ``sum(per-sample MSE) / global samples`` is back-propagated. Ranks run the same number of
forwards (FSDP gathers parameters in each): a rank with fewer groups runs weightless ones. Gradients
are reduced on the step's last backward only.

Context parallel ranks (same data-parallel rank, so the same samples and draws) each run their share
of the video tokens and all see the whole gathered output, so each computes the whole loss (it is
summed over the data-parallel group only) while their parameter gradients, each its own tokens'
share, are summed by FSDP over ``dp_shard x cp``. Tensor parallel ranks compute the same loss too.

``openspeed train`` comes here when ``model.path`` is a Wan pipeline (see :func:`is_dit_run`).
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from openspeed.accelerator import destroy_distributed, get_accelerator, init_distributed
from openspeed.config import RunConfig, dump_yaml, resolve_layout
from openspeed.errors import ConfigError

EMA_PREFIX = "ema/"


def is_dit_run(cfg: RunConfig) -> bool:
    """Whether ``cfg.model.path`` is a diffusion-transformer model (a Wan pipeline or transformer folder)."""
    from openspeed.models.loading import hf_model_type, read_hf_config
    from openspeed.models.registry import get_model_spec
    from openspeed.training.model_setup import model_dir

    path = model_dir(cfg.model.path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        hf_config = read_hf_config(path)
        return get_model_spec(hf_model_type(hf_config, path)).name == "wan"
    except Exception:  # noqa: BLE001 - anything unreadable is for the VLM path to report
        return False


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_dit(cfg: RunConfig, dims=None, device: torch.device | str = "cpu", load_weights: bool = True):
    """The run's DiT: meta build -> LoRA -> freeze -> recompute -> parallel plan -> materialise -> weights.

    ``dims`` ``None`` builds a plain single-process model (no recompute, no sharding), as inference does.
    With ``load_weights`` the pipeline's transformer weights are loaded if it has any, otherwise
    everything is initialised from ``train.seed``; adapters start as peft's (``B = 0``).
    Returns ``(model, spec, config, adapted module names)``.
    """
    from openspeed.lora import apply_lora, init_lora, is_lora_param, mark_only_lora_trainable
    from openspeed.models.loading import has_hf_weights
    from openspeed.models.wan.convert import native_module_to_diffusers
    from openspeed.training.init import init_weights
    from openspeed.training.model_setup import load_weights_into, model_config_from_run, model_dir

    spec, config = model_config_from_run(cfg)
    with torch.device("meta"):
        model = spec.build(config)
    adapted: list[str] = []
    lora = cfg.model.lora
    if lora.rank > 0:
        adapted = apply_lora(model, lora.targets, lora.rank, lora.alpha, alias=native_module_to_diffusers,
                             dropout=lora.dropout)
        mark_only_lora_trainable(model)
    if dims is not None:
        if cfg.memory.recompute != "none":
            from openspeed.memory.recompute import apply_recompute
            from openspeed.models.wan.memory_plan import memory_plan

            apply_recompute(model, cfg.memory.recompute, cfg.memory.recompute_num_layers, plan=memory_plan(model))
        spec.parallelize(model, dims, cfg)
    model.to_empty(device=device)
    spec.reset_buffers(model, torch.device(device))
    if load_weights:
        path = model_dir(cfg.model.path)
        if has_hf_weights(path):
            load_weights_into(model, spec, config, path, added=is_lora_param)
        else:
            std = cfg.model.init_std if cfg.model.init_std is not None else spec.init_std(config)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{path} has no weights: initialising from seed {cfg.train.seed} (std {std})",
                      file=sys.stderr)
            init_weights(model, cfg.train.seed, std)
        if adapted:
            init_lora(model, cfg.train.seed)
    return model, spec, config, adapted


def check_dit_config(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """What the DiT loop cannot honour yet, refused in one line."""
    if sizes["pp"] > 1:
        raise ConfigError(f"parallel.pp={sizes['pp']}: not available for wan training yet (use dp, cp or tp)")
    if sizes["tp"] > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: the wan tensor-parallel plan has no sequence "
                          "parallelism (use parallel.cp to split the video tokens)")
    if sizes["tp"] > 1 and cfg.model.lora.rank > 0:
        raise ConfigError(f"parallel.tp={sizes['tp']}: LoRA with tensor parallelism is not available for wan "
                          "training yet (use dp or cp)")
    mem = cfg.memory
    if mem.offload_activations or mem.offload_optimizer or mem.budget_gb is not None:
        raise ConfigError("memory offload and memory.budget_gb are not available for wan training yet "
                          "(memory.recompute is)")
    if cfg.data.val_path:
        raise ConfigError("data.val_path: validation is not available for wan training yet")
    if cfg.data.packing:
        raise ConfigError("data.packing is for token sequences; wan clips are bucketed instead")


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


class WeightEMA(nn.Module):
    """Exponential moving average of the trainable parameters: ``ema = decay * ema + (1 - decay) * p``.

    A plain implementation (one ``lerp_`` per tensor). The averages are buffers named
    ``ema/<parameter name with / for .>`` (shards of the same layout as the parameters under FSDP), so
    they go into the run's DCP checkpoints beside the model and any layout can resume them.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self._pairs: list[tuple[str, nn.Parameter]] = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = EMA_PREFIX + name.replace(".", "/")
                self.register_buffer(key, param.detach().clone().float())
                self._pairs.append((key, param))

    @torch.no_grad()
    def update(self) -> None:
        for key, param in self._pairs:
            self._buffers[key].lerp_(param.detach().float(), 1.0 - self.decay)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def run_dit_training(cfg: RunConfig) -> dict:
    """Train a diffusion transformer as ``cfg`` says; returns a summary dict (rank 0's view)."""
    acc = get_accelerator()
    acc.configure_math()
    if cfg.train.cpu_threads is not None and acc.device_type == "cpu":
        if cfg.train.cpu_threads < 1:
            raise ConfigError(f"train.cpu_threads must be >= 1, got {cfg.train.cpu_threads}")
        torch.set_num_threads(cfg.train.cpu_threads)
    # A process group that is already up (a test's workers, a caller's own) is left to its owner.
    owns_group = not dist.is_initialized()
    rank, world = init_distributed()
    try:
        return _train(cfg, acc, rank, world)
    finally:
        if owns_group:
            destroy_distributed()


def _train(cfg: RunConfig, acc, rank: int, world: int) -> dict:
    from openspeed.data.loader import step_batches
    from openspeed.data.schedule import GlobalBatchSchedule
    from openspeed.distributed.fsdp import set_gradient_sync
    from openspeed.distributed.mesh import build_mesh
    from openspeed.tasks.wan_flow_matching import WanFlowMatchingTask
    from openspeed.training import checkpoint as ckpt
    from openspeed.training.grads import clip_grad_norm
    from openspeed.training.metrics import MetricsWriter, Progress
    from openspeed.training.optim import Optimizers
    from openspeed.training.trainer import (
        _all_reduce,
        _gather_skipped,
        _plot,
        _rng_state,
        _seed_all,
        _StopFlag,
        resume_run,
        run_summary,
        stop_early,
        summary_line,
    )

    sizes = resolve_layout(cfg, world)
    check_dit_config(cfg, sizes)
    dims = build_mesh(sizes, acc.device_type, cfg.parallel.cp_algo, cfg.parallel.cp_ulysses_degree)
    dp_group, dp_rank, dp_size = dims.dp_group(), dims.dp_rank(), dims.dp_size
    is_main = rank == 0
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_all(acc, cfg.train.seed + rank)

    run_dir = cfg.train.run_dir
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))

    model, spec, config, adapted = build_dit(cfg, dims, acc.device)
    task = WanFlowMatchingTask(cfg, acc.device, model_config=config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters")
    optim = Optimizers([model], cfg.optim, cfg.train.max_steps)
    ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    parts = [model] + ([ema] if ema is not None else [])
    optimizers = optim.per_part + ([None] if ema is not None else [])
    if is_main:
        total = sum(p.numel() for p in model.parameters())
        train_n = sum(p.numel() for p in trainable)
        what = f"LoRA rank {cfg.model.lora.rank} on {len(adapted)} layers, " if adapted else ""
        print(f"wan DiT: {what}{train_n:,} of {total:,} parameters trained; {len(task.train_set)} samples",
              file=sys.stderr)

    # ---------------------------------------------------------------- resume
    start_step, resume_from = resume_run(cfg, acc, rank, parts, optim, task, per_part=optimizers)
    if start_step >= cfg.train.max_steps and resume_from:
        return {"steps": 0, "resumed_from": resume_from}

    metrics = MetricsWriter(run_dir, enabled=is_main, resume_step=start_step, tensorboard=cfg.logging.tensorboard)
    schedule = GlobalBatchSchedule(len(task.train_set), cfg.train.global_batch_size, cfg.train.seed)
    stop = _StopFlag()
    stop.install()
    progress = Progress(cfg.train.max_steps, start_step, enabled=is_main and cfg.logging.progress)
    checkpoint_root = ckpt.checkpoint_root(run_dir)
    last_saved = start_step if resume_from else -1
    train_start = time.perf_counter()
    last_loss = float("nan")

    def save(step: int) -> None:
        nonlocal last_saved
        skipped = _gather_skipped(task.skipped, dp_group)
        path = ckpt.save_checkpoint(
            checkpoint_root, step, parts, optimizers,
            {"scheduler": optim.scheduler_state(), "skipped": {str(i): r for i, r in skipped.items()},
             "seed": cfg.train.seed, "ema": ema is not None},
            _rng_state(acc), keep_last=cfg.checkpoint.keep_last,
        )
        if adapted:
            _save_adapter(cfg, model, os.path.join(path, "adapter"), is_main)
        last_saved = step

    step = start_step
    loader = step_batches(task, schedule, start_step + 1, cfg.train.max_steps, dp_rank, dp_size,
                          cfg.train.micro_batch_size, cfg.data.num_workers)
    for step, (batches, skips) in zip(range(start_step + 1, cfg.train.max_steps + 1), loader):
        t0 = time.perf_counter()
        task.skipped.update(skips)
        encoded = [[task.encode_sample(s) for s in batch] for batch in batches]
        groups = [task.group(batch) for batch in encoded]
        # Every rank runs as many forwards per micro-batch as the rank with the most shape groups.
        counts = torch.tensor([len(g) for g in groups] + [sum(task.count_samples(b) for b in batches)],
                              dtype=torch.float64)
        most = counts[:-1].clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=dp_group)
        num_samples, tokens = _all_reduce(float(counts[-1]), float(sum(task.count_tokens(b) for b in encoded)),
                                          group=dp_group)
        # Padding groups carry scale 0: they run (FSDP needs every rank) and add nothing.
        forwards = []
        for gs, n in zip(groups, most.tolist()):
            forwards += [(g, 1.0) for g in gs] + [(gs[0], 0.0)] * (int(n) - len(gs))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, (group, scale) in enumerate(forwards):
            set_gradient_sync(model, i == len(forwards) - 1)
            with acc.autocast(cfg.train.precision):
                loss = task.group_loss(model, group, step, int(num_samples), scale=scale)
            loss.backward()
            loss_sum += loss.detach().double().cpu()
        dist.all_reduce(loss_sum, group=dp_group)
        grad_norm = clip_grad_norm(trainable, cfg.train.grad_clip)
        lr = optim.lr
        if math.isfinite(grad_norm):
            optim.step()
            if ema is not None:
                ema.update()
        elif is_main:
            progress.write(f"step {step}: non-finite gradient norm, update skipped")
        optim.schedule_step()
        optim.zero_grad()
        acc.synchronize()
        elapsed = time.perf_counter() - t0
        last_loss = loss_sum.item()
        record = {
            "step": step,
            "loss": last_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples": int(num_samples),
            "samples_per_s": num_samples / elapsed if elapsed > 0 else 0.0,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time_s": elapsed,
        }
        metrics.log(record)
        progress.update(last_loss, lr, record["tokens_per_s"])

        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            save(step)
        stopped = stop_early(cfg, stop, step, start_step, save, last_saved == step, loader, progress, metrics,
                             run_dir, is_main)
        if stopped is not None:
            return stopped

    loader.close()
    progress.close()
    if cfg.checkpoint.save_final and last_saved != step and step > start_step:
        save(step)
    summary = run_summary(task.skipped, dp_group, metrics, is_main, step, start_step, last_loss,
                          time.perf_counter() - train_start)
    if is_main:
        print(summary_line(summary), file=sys.stderr)
        _plot(metrics, run_dir)
    metrics.close()
    return summary


def _save_adapter(cfg: RunConfig, model: nn.Module, out_dir: str, is_main: bool) -> None:
    """Write the adapters in peft's format (diffusers module names); every rank gathers, rank 0 writes."""
    from openspeed.lora import lora_state_dict, save_peft_adapter
    from openspeed.models.wan.convert import native_module_to_diffusers

    tensors = lora_state_dict(model)
    if is_main:
        lora = cfg.model.lora
        alpha = lora.alpha if lora.alpha is not None else lora.rank
        save_peft_adapter(out_dir, tensors, lora.rank, alpha, native_module_to_diffusers,
                          base_model_name_or_path=os.path.abspath(cfg.model.path))


__all__ = ["WeightEMA", "build_dit", "is_dit_run", "run_dit_training"]
