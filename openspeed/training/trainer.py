"""The training loop. Reads top to bottom: set up, resume, then one optimizer step per iteration."""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from openspeed.accelerator import get_accelerator, init_distributed
from openspeed.config import RunConfig, bind_known_family, dump_yaml, resolve_layout
from openspeed.data.loader import step_batches
from openspeed.data.schedule import GlobalBatchSchedule
from openspeed.distributed import comm
from openspeed.distributed.comm import destroy_distributed
from openspeed.distributed.fsdp import set_gradient_sync
from openspeed.distributed.mesh import build_mesh
from openspeed.distributed.pipeline import (
    PipelineInferenceModel,
    build_pipeline,
    check_pipeline_config,
    norm_exclusions,
    pipeline_train_step,
    sync_tied_grads,
)
from openspeed.distributed.tensor_parallel import (
    is_vocab_parallel,
    loss_context,
    mark_vocab_parallel,
    plain_tensor,
)
from openspeed.errors import ConfigError
from openspeed.lora import adapter_view, lora_state_dict, save_peft_adapter
from openspeed.memory import adaptive_recompute, max_over_ranks, measure_layers, optimizer_state_bytes
from openspeed.memory.adaptive import GB
from openspeed.models.loading import model_config_from_run
from openspeed.ops.level import fused, optimization_level, set_optimization_level
from openspeed.tasks.base import EvalContext
from openspeed.training import checkpoint as ckpt
from openspeed.training.compile import CompileClock, check_compile, compile_enabled
from openspeed.training.ema import WeightEMA
from openspeed.training.grads import clip_grad_norm
from openspeed.training.metrics import MetricsWriter, Progress
from openspeed.training.model_setup import build_training_model
from openspeed.training.optim import Optimizers
from openspeed.training.profiling import StepProfiler
from openspeed.training.run_dir import effective_resume, new_run_id, prepare_run_dir


class _StopFlag:
    """Set by SIGTERM: the loop saves a checkpoint after the current step and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.requested = True


def _rng_state(acc) -> dict:
    """Every random generator's state as plain numbers and lists (saved as JSON: no pickle)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": {device: state.tolist() for device, state in acc.rng_state().items()},
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_rng(acc, state: dict) -> None:
    acc.set_rng_state({device: torch.tensor(v, dtype=torch.uint8) for device, v in state["torch"].items()})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _seed_all(acc, seed: int) -> None:
    acc.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def check_supported(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """Layouts this version cannot run: rejected with one line instead of run wrongly."""
    if sizes["cp"] > 1 and sizes["pp"] > 1:
        raise ConfigError(
            f"parallel.cp={sizes['cp']} with parallel.pp={sizes['pp']}: context parallel is not available "
            "inside pipeline stages yet; use cp with dp_shard / dp_replicate / tp"
        )
    if cfg.parallel.sequence_parallel and sizes["tp"] == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if cfg.data.packing and sizes["pp"] > 1:
        raise ConfigError(
            "data.packing=true is not available with parallel.pp > 1 (pipeline micro-batches are padded "
            "to data.max_seq_len); set data.packing=false"
        )


class _AdaptiveRecompute:
    """``memory.budget_gb``: measure the first micro-batch's saved bytes per layer, then recompute the
    fewest layers (the same on every rank) that bring one micro-batch plus the model and optimizer
    state under the budget."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.report = None
        self.choice = None

    def decide(self, model, optim, budget_gb: float):
        report = max_over_ranks(self.report)
        static = sum(p.numel() * p.element_size() for p in model.parameters())
        static += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        static += sum(optimizer_state_bytes(o).device for o in optim.optimizers)
        self.choice = adaptive_recompute(model, self.plan, report, budget_gb, static_bytes=int(static))
        return self.choice


def resume_run(
    cfg: RunConfig, acc, rank: int, parts, optim: Optimizers, task, per_part: list | None = None
) -> tuple[int, str | None, dict]:
    """Load the checkpoint ``train.resume`` names (``auto``: the latest complete one in the run dir).

    Restores model parts, their optimizers (``per_part``, default ``optim.per_part``; ``None`` for a
    part without one), the LR schedule, the skipped-sample record and the RNG state;
    returns ``(start_step, checkpoint path or None, its train state)``. Rank 0 says what it resumed
    from, or that the checkpoint is already at ``train.max_steps``.
    """
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = ckpt.latest_checkpoint(cfg.train.run_dir)
    elif cfg.train.resume != "none":
        resume_from = cfg.train.resume
    if not resume_from:
        return 0, None, {}
    state, rng = ckpt.load_checkpoint(resume_from, parts, optim.per_part if per_part is None else per_part)
    start_step = int(state["step"])
    optim.load_scheduler_state(state["scheduler"])
    task.skipped.update({int(i): r for i, r in state.get("skipped", {}).items()})
    if rng is not None:
        _restore_rng(acc, rng)
    else:
        _seed_all(acc, cfg.train.seed * 7919 + start_step * 31 + rank)
    if rank == 0:
        if start_step >= cfg.train.max_steps:
            print(f"nothing to do: checkpoint step {start_step} >= train.max_steps {cfg.train.max_steps}",
                  file=sys.stderr)
        else:
            print(f"resumed from {resume_from} at step {start_step}", file=sys.stderr)
    return start_step, resume_from, state


def _check_pipeline(cfg: RunConfig, sizes: dict[str, int], n_micro: int, spec, config) -> None:
    """Pipeline settings the model and schedule can honour, checked before anything is built."""
    if spec.pipeline is None:
        raise ConfigError(f"parallel.pp={sizes['pp']}: {spec.name} has no pipeline plan")
    check_pipeline_config(sizes["pp"], cfg.parallel.virtual_stages, cfg.parallel.pp_schedule, n_micro)
    spec.pipeline.check(config, sizes["pp"] * cfg.parallel.virtual_stages, cfg.parallel.pipeline_num_layers)


def run_training(cfg: RunConfig) -> dict:
    """Train as ``cfg`` says, whatever the model family; returns a summary dict (rank 0's view)."""
    acc = get_accelerator()
    acc.configure_math()
    if cfg.train.cpu_threads is not None and acc.device_type == "cpu":
        if cfg.train.cpu_threads < 1:
            raise ConfigError(f"train.cpu_threads must be >= 1, got {cfg.train.cpu_threads}")
        torch.set_num_threads(cfg.train.cpu_threads)
    set_optimization_level(cfg.train.optimization_level)
    if cfg.family is None:
        bind_known_family(cfg)
    # A process group that is already up (a test's workers, a caller's own) is left to its owner.
    owns_group = not dist.is_initialized()
    rank, world = init_distributed()
    try:
        spec, _ = model_config_from_run(cfg)
        return (spec.trainer or Trainer)(cfg, acc, rank, world).train()
    finally:
        if owns_group:
            destroy_distributed()


class Trainer:
    """The one training loop. :meth:`train` reads top to bottom: set up, resume, then one optimizer
    step per iteration, evaluation, checkpoints, the end-of-run report.

    Override points, for a family whose step really differs (the defaults serve every built-in
    family through its task, :mod:`openspeed.tasks.base`):

    * :meth:`build_model` -> ``(parts, spec, config, adapted)``;
    * :meth:`step_work` -> what this rank runs in a step (its forwards) and their FLOPs;
    * :meth:`forward_backward` -> the step's summed loss (a device tensor, before the dp reduction);
    * :meth:`train_step` -> the step's loss, gradient norm and learning rate.
    """

    def __init__(self, cfg: RunConfig, acc, rank: int, world: int) -> None:
        self.cfg, self.acc, self.rank, self.world = cfg, acc, rank, world
        self.is_main = rank == 0

    # ---------------------------------------------------------------- override points

    def build_model(self, dims):
        """This rank's model parts, their spec and config, and the LoRA-adapted module names."""
        return build_training_model(self.cfg, dims, self.acc.device)

    def settle_compile(self, spec, sizes: dict[str, int]) -> None:
        """``train.compile``: asked for, a layout it cannot run is a one-line error; left at its default
        (on off the CPU), such a layout runs uncompiled with a note."""
        cfg = self.cfg
        self.compile_clock = None
        if not compile_enabled(cfg, self.acc.device_type):
            return
        try:
            check_compile(cfg, sizes, spec)
        except ConfigError as exc:
            if cfg.train.compile is not None:
                raise
            if self.is_main:
                print(f"note: running uncompiled ({exc})", file=sys.stderr)
            cfg.train.compile = False
            return
        self.compile_clock = CompileClock.started()

    def forward_backward(self, work: list, step: int, num_items: int):
        """Forward and backward over this rank's work of the step (:meth:`step_work`); returns the
        summed loss, on the device."""
        cfg, acc, task, model = self.cfg, self.acc, self.task, self.model
        if self.pipe is not None:
            with acc.autocast(cfg.train.precision), loss_context(model):
                loss_sum = pipeline_train_step(self.pipe, work, num_items)
            sync_tied_grads(self.pipe)
            return loss_sum
        loss_sum = torch.zeros((), dtype=torch.float32, device=acc.device)
        for i, (inputs, scale) in enumerate(work):
            set_gradient_sync(model, i == len(work) - 1)
            with acc.autocast(cfg.train.precision), loss_context(model):
                adaptive = self.adaptive
                if adaptive is not None and adaptive.report is None:
                    adaptive.report, loss = measure_layers(
                        model, adaptive.plan, lambda x=inputs: task.loss(model, x, num_items, step)
                    )
                else:
                    loss = task.loss(model, inputs, num_items, step)
                if scale != 1.0:
                    loss = loss * scale
                loss.backward()
            loss_sum += plain_tensor(loss).detach().float()
        return loss_sum

    def train_step(self, work: list, step: int, num_items: int) -> tuple[float, float, float]:
        """One optimizer step: forward/backward, loss reduction, clipping, update, EMA, schedule.
        Returns ``(loss, grad_norm, lr)``."""
        loss_sum = self.forward_backward(work, step, num_items)
        comm.all_reduce(loss_sum, group=self.loss_group)
        grad_norm = clip_grad_norm(self.trainable, self.cfg.train.grad_clip, self.norm_group, self.norm_skip)
        lr = self.optim.lr
        if math.isfinite(grad_norm):
            self.optim.step()
            if self.ema is not None:
                self.ema.update()
        elif self.is_main:
            self.progress.write(f"step {step}: non-finite gradient norm, update skipped")
        self.optim.schedule_step()
        self.optim.zero_grad()
        return float(loss_sum.item()), grad_norm, lr

    # ---------------------------------------------------------------- pieces

    def step_work(self, batches: list, step: int) -> tuple[list, float]:
        """What this rank runs in the step, and its model FLOPs.

        The work is the micro-batches themselves for a pipeline, else ``(inputs, scale)`` of every
        forward (scale 0: a weightless forward that keeps this rank in step with one that has more,
        FSDP needing every rank; it does no model work, so it counts no FLOPs).
        """
        if self.pipe is not None:
            return batches, sum(self.task.flops(b) for b in batches)
        forwards = self.step_forwards(batches, step)
        return forwards, sum(self.task.flops(inputs) for inputs, scale in forwards if scale)

    def step_forwards(self, batches: list, step: int) -> list[tuple]:
        """``(inputs, scale)`` of every forward this rank runs in the step (see :meth:`step_work`)."""
        per_batch = [self.task.forwards(b, step) for b in batches]
        if not self.task.uneven_forwards or self.dp_size == 1:
            return [(f, 1.0) for fs in per_batch for f in fs]
        most = comm.max_counts([len(fs) for fs in per_batch], group=self.dp_group)
        out = []
        for fs, n in zip(per_batch, most):
            out += [(f, 1.0) for f in fs] + [(fs[0], 0.0)] * (n - len(fs))
        return out

    def eval_context(self, step: int) -> EvalContext:
        return EvalContext(self.cfg, self.acc, self.dp_group, self.dp_rank, self.dp_size, step, self.started)

    def evaluate(self, step: int) -> dict:
        self.loader.wait()  # the next step's loading shares the task's data objects
        record = self.task.evaluate(self.model, self.eval_context(step))
        self.metrics.log({"step": step, **{k: v for k, v in record.items() if k != "scores"}})
        return record

    def save(self, step: int) -> None:
        cfg = self.cfg
        skipped = _gather_skipped(self.task.skipped, self.dp_group)
        path = ckpt.save_checkpoint(
            ckpt.checkpoint_root(cfg.train.run_dir), step, self.saved_parts, self.saved_optimizers,
            {"scheduler": self.optim.scheduler_state(), "skipped": {str(i): r for i, r in skipped.items()},
             "seed": cfg.train.seed, "ema": self.ema is not None, "run_id": self.run_id},
            _rng_state(self.acc), keep_last=cfg.checkpoint.keep_last,
        )
        if self.adapted and self.pipe is None:
            save_adapter(cfg, self.spec, self.model, os.path.join(path, "adapter"), self.is_main)
        self.last_saved = step

    # ---------------------------------------------------------------- the loop

    def train(self) -> dict:
        cfg, acc, rank = self.cfg, self.acc, self.rank
        sizes = resolve_layout(cfg, self.world)
        check_supported(cfg, sizes)
        dims = build_mesh(sizes, acc.device_type, cfg.parallel.cp_algo, cfg.parallel.cp_ulysses_degree)
        cp = None
        if sizes["cp"] > 1:
            try:
                cp = dims.context_parallel()
            except ConfigError as exc:
                raise ConfigError(f"parallel.cp_algo={cfg.parallel.cp_algo}: {exc}") from None
        self.dp_group, self.dp_rank, self.dp_size = dims.dp_group(), dims.dp_rank(), dims.dp_size
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        _seed_all(acc, cfg.train.seed + rank)

        run_dir = cfg.train.run_dir
        cfg.train.resume = effective_resume(cfg)
        self.run_id = claim_run_dir(cfg, self.is_main)

        spec, config = model_config_from_run(cfg)
        if spec.check_layout is not None:
            spec.check_layout(cfg, sizes)
        self.settle_compile(spec, sizes)
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        if sizes["pp"] > 1:
            _check_pipeline(cfg, sizes, n_micro, spec, config)
        parts, spec, config, adapted = self.build_model(dims)
        self.spec, self.config, self.adapted = spec, config, adapted
        task = self.task = spec.task(cfg, acc.device, config, spec)
        if cp is not None:
            task.configure_context_parallel(cp)
        # Each cp rank's loss covers its share of the tokens (summed over cp), or the whole loss.
        self.loss_group = dims.loss_group() if task.cp_splits_loss else self.dp_group
        if task.val_set is None and cfg.train.eval_interval:
            raise ConfigError(f"train.eval_interval={cfg.train.eval_interval} needs data.val_path")
        trainable = self.trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
        if not comm.any_rank(bool(trainable)):
            raise ConfigError(f"model.freeze={cfg.model.freeze} leaves no trainable parameters")
        if self.is_main:
            total = sum(p.numel() for part in parts for p in part.parameters())
            train_n = sum(p.numel() for p in trainable)
            what = f"LoRA rank {cfg.model.lora.rank} on {len(adapted)} layers, " if adapted else ""
            print(f"{spec.name}: {what}{train_n:,} of {total:,} parameters train"
                  f"{' (this stage)' if sizes['pp'] > 1 else ''}; {len(task.train_set)} samples", file=sys.stderr)
        optim = self.optim = Optimizers(parts, cfg.optim, cfg.train.max_steps, cfg.memory)
        self.ema = None
        if cfg.train.ema_decay is not None:
            if sizes["pp"] > 1:
                raise ConfigError("train.ema_decay with parallel.pp > 1 is not available yet")
            self.ema = WeightEMA(parts[0], cfg.train.ema_decay)
        saved = [adapter_view(part) for part in parts] if adapted else list(parts)
        self.saved_parts = saved + ([self.ema] if self.ema is not None else [])
        self.saved_optimizers = optim.per_part + ([None] if self.ema is not None else [])
        self.pipe = None
        if sizes["pp"] > 1:
            packer = spec.pipeline.packer(config, cfg.data.max_seq_len, task.pad_token_id, cfg.train.micro_batch_size)
            self.pipe = build_pipeline(parts, dims, acc.device, cfg.parallel.pp_schedule, n_micro,
                                       spec.pipeline.loss, packer)
            model = PipelineInferenceModel(self.pipe)  # evaluation and decoding through the stages
            if any(is_vocab_parallel(part) for part in parts):
                mark_vocab_parallel(model)
        else:
            model = parts[0]
        self.model = model
        self.norm_group = self.pipe.group if self.pipe is not None else None
        self.norm_skip = norm_exclusions(self.pipe) if self.pipe is not None else []

        # ---------------------------------------------------------------- resume
        start_step, resume_from, resumed = resume_run(cfg, acc, rank, self.saved_parts, optim, task,
                                                      per_part=self.saved_optimizers)
        # A resumed run is the same run: its checkpoints keep the id (one without an id starts one).
        self.run_id = resumed.get("run_id") or self.run_id
        if start_step >= cfg.train.max_steps and resume_from:
            return {"steps": 0, "resumed_from": resume_from}

        metrics = self.metrics = MetricsWriter(run_dir, enabled=self.is_main, resume_step=start_step,
                                               tensorboard=cfg.logging.tensorboard)
        # What this run computes with: the level's op paths and the optimizer that implements them.
        first = optim.optimizers[0] if optim.optimizers else None
        metrics.log({"step": start_step, "family": spec.name, "optimization_level": optimization_level(),
                     "fused_ops": fused(), "optimizer": type(first).__name__ if first is not None else None,
                     "optimizer_fast": bool(getattr(first, "fast", False))})
        schedule = GlobalBatchSchedule(len(task.train_set), cfg.train.global_batch_size, cfg.train.seed)
        stop = _StopFlag()
        stop.install()
        progress = self.progress = Progress(cfg.train.max_steps, start_step, enabled=self.is_main and cfg.logging.progress)
        self.last_saved = start_step if resume_from else -1
        self.started = time.perf_counter()
        last_loss = float("nan")
        profiler = StepProfiler(cfg.profile, rank, run_dir)
        last_eval: dict = {}
        step = start_step
        self.adaptive = None
        if cfg.memory.budget_gb is not None:
            if self.pipe is not None:
                raise ConfigError("memory.budget_gb (adaptive recompute) is not available with parallel.pp > 1 yet")
            if spec.memory_plan is None:
                raise ConfigError(f"memory.budget_gb: {spec.name} has no memory plan")
            self.adaptive = _AdaptiveRecompute(spec.memory_plan(model))

        loader = self.loader = step_batches(task, schedule, start_step + 1, cfg.train.max_steps, self.dp_rank,
                                            self.dp_size, cfg.train.micro_batch_size, cfg.data.num_workers,
                                            annotate=task.annotate, pin_memory=acc.device_type != "cpu")
        compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else acc.peak_flops(compute_dtype)
        # What MFU divides by: the vendor's dense peak on known GPUs / NPUs, else the measured matmul rate.
        metrics.log({"step": start_step, "mfu_of": "train.peak_tflops" if cfg.train.peak_tflops
                     else acc.peak_source(compute_dtype), "peak_tflops": peak / 1e12})
        for step, (batches, skips) in zip(range(start_step + 1, cfg.train.max_steps + 1), loader):
            profiler.before_step(step)
            t0 = time.perf_counter()
            task.skipped.update(skips)
            work, flops = self.step_work(batches, step)
            # One int64 collective for the step's counts and model FLOPs (integers, exact past 2^53).
            targets, tokens, flops = comm.sum_counts(sum(task.count_targets(b) for b in batches),
                                                     sum(task.count_tokens(b) for b in batches),
                                                     round(flops), group=self.dp_group)
            last_loss, grad_norm, lr = self.train_step(work, step, int(targets))
            if self.adaptive is not None and self.adaptive.choice is None:
                choice = self.adaptive.decide(model, optim, cfg.memory.budget_gb)
                metrics.log({"step": step, "adaptive_recompute": choice.recompute,
                             "adaptive_offload": choice.offload,
                             "adaptive_estimated_gb": choice.estimated_bytes / GB})
                progress.write(
                    f"memory.budget_gb={cfg.memory.budget_gb}: recomputing {len(choice.recompute)} layers, "
                    f"estimated {choice.estimated_bytes / GB:.4f} GB (measured {choice.measured_bytes / GB:.4f} GB)"
                )
            acc.synchronize()
            elapsed = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                task.count_name: int(targets),
                f"{task.count_name}_per_s": targets / elapsed if elapsed > 0 else 0.0,
                "step_time_s": elapsed,
            }
            # Model FLOPs of the whole step shared over every rank: the achieved rate per device.
            per_device = flops / self.world / elapsed if elapsed > 0 else 0.0
            record["tflops"] = per_device / 1e12
            record["mfu"] = per_device / peak
            if self.compile_clock is not None:
                # Cumulative: later steps with new input shapes may compile again.
                record["compile_s"] = self.compile_clock.seconds
                if step == start_step + 1 and self.is_main:
                    line = (f"train.compile: {self.compile_clock.compilations} compilations "
                            f"({cfg.train.compile_backend}) took {self.compile_clock.seconds:.1f} s "
                            f"of the first step's {elapsed:.1f} s")
                    progress.write(line) if progress.bar is not None else print(line, file=sys.stderr)
            metrics.log(record)
            progress.update(last_loss, lr, record["tokens_per_s"], record["mfu"])
            trace = profiler.after_step(step)
            if trace:
                progress.write(f"profiler trace written to {trace}")

            if task.val_set is not None and cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                last_eval = {"step": step, "record": self.evaluate(step)}
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                self.save(step)
            stopped = stop_early(cfg, stop, step, start_step, self.save, self.last_saved == step, loader, progress,
                                 metrics, run_dir, self.is_main)
            if stopped is not None:
                return stopped

        loader.close()
        progress.close()
        final_eval: dict = {}
        if task.val_set is not None and step > start_step:
            final_eval = last_eval["record"] if last_eval.get("step") == step else self.evaluate(step)
        if cfg.checkpoint.save_final and self.last_saved != step and step > start_step:
            self.save(step)
        report = {"metrics": {}, "summary": {}, "lines": []}
        if step > start_step:
            report = task.final_report(model, self.eval_context(step), final_eval)
            if report["metrics"]:
                metrics.log({"step": step, **report["metrics"]})
        seconds = time.perf_counter() - self.started
        summary = run_summary(task.skipped, self.dp_group, metrics, self.is_main, step, start_step, last_loss, seconds)
        summary.update({k: v for k, v in final_eval.items() if k != "scores"})
        summary.update(report["summary"])
        if self.is_main:
            extra = [f"val_loss {final_eval['val_loss']:.4f}"] if "val_loss" in final_eval else []
            print(summary_line(summary, extra), file=sys.stderr)
            _plot(metrics, run_dir)
            for line in report["lines"]:
                print(line, flush=True)
        metrics.close()
        return summary


def claim_run_dir(cfg: RunConfig, is_main: bool) -> str:
    """Rank 0 checks ``train.run_dir`` (see :mod:`openspeed.training.run_dir`), moves an old run aside
    under ``train.overwrite=true``, creates the directory and writes ``config.yaml``; every rank gets
    the outcome, so a refusal (or an unwritable directory) is the same one-line error on all of them.
    Returns a new run id (a resumed run then takes its checkpoint's)."""
    run_dir = cfg.train.run_dir
    outcome: list = [None, None, None]  # error, where an old run went, run id
    if is_main:
        try:
            moved = prepare_run_dir(cfg)
            os.makedirs(run_dir, exist_ok=True)
            dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
            outcome = [None, moved, new_run_id()]
        except ConfigError as exc:
            outcome = [str(exc), None, None]
        except OSError as exc:
            outcome = [f"train.run_dir={run_dir}: cannot write {exc.filename or run_dir}: {exc.strerror or exc}",
                       None, None]
    outcome = comm.broadcast_object(outcome, src=0)
    error, moved, run_id = outcome
    if error is not None:
        raise ConfigError(error)
    if moved and is_main:
        print(f"train.overwrite=true: the earlier run in {run_dir} moved to {moved}", file=sys.stderr)
    return run_id


def save_adapter(cfg: RunConfig, spec, model, out_dir: str, is_main: bool) -> None:
    """Write a LoRA run's adapters in peft's format, in the reference library's module names
    (``spec.module_name_to_ref``); every rank gathers, rank 0 writes."""
    tensors = lora_state_dict(model)
    if is_main:
        lora = cfg.model.lora
        alpha = lora.alpha if lora.alpha is not None else lora.rank
        save_peft_adapter(out_dir, tensors, lora.rank, alpha, spec.module_name_to_ref,
                          base_model_name_or_path=os.path.abspath(cfg.model.path), dropout=lora.dropout)


def stop_early(cfg: RunConfig, stop: _StopFlag, step: int, start_step: int, save, saved: bool, loader,
               progress, metrics: MetricsWriter, run_dir: str, is_main: bool) -> dict | None:
    """Save and wind the run down after ``step`` when SIGTERM reached any rank or ``train.exit_interval``
    divides the step (before the last step); returns the run's result then, else None.

    Collective (one all-reduce): every rank calls it after every step. ``save(step)`` writes the
    step's checkpoint, unless ``saved`` says it was just written.
    """
    exit_now = bool(cfg.train.exit_interval) and step % cfg.train.exit_interval == 0
    stop_now = comm.any_rank(stop.requested)
    if not (stop_now or exit_now) or step >= cfg.train.max_steps:
        return None
    loader.close()
    if not saved:
        save(step)
    progress.close()
    if is_main:
        why = "SIGTERM" if stop_now else f"train.exit_interval={cfg.train.exit_interval}"
        print(f"{why}: saved checkpoint at step {step}, exiting", file=sys.stderr)
        _plot(metrics, run_dir)
    metrics.close()
    return {"steps": step - start_step, "stopped_at": step}


def run_summary(skipped_here: dict[int, str], dp_group, metrics: MetricsWriter, is_main: bool, step: int,
                start_step: int, last_loss: float, seconds: float) -> dict:
    """The finished run's summary (steps, final loss, time, samples skipped on any dp rank, by reason);
    rank 0 logs the skipped counts. Collective over ``dp_group``."""
    skipped = Counter(_gather_skipped(skipped_here, dp_group).values())
    summary = {
        "steps": step - start_step,
        "final_loss": last_loss,
        "seconds": seconds,
        "skipped_samples": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
    }
    if is_main:
        metrics.log({"step": step, "skipped_samples": summary["skipped_samples"],
                     "skipped_by_reason": dict(skipped)})
    return summary


def summary_line(summary: dict, extra: list[str] | tuple[str, ...] = ()) -> str:
    """``trained N steps in S s; final loss L; <extra>; skipped samples: K (reason=count, ...)``."""
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped_by_reason"].items()))
    skipped = f"skipped samples: {summary['skipped_samples']}" + (f" ({reasons})" if reasons else "")
    return "; ".join([f"trained {summary['steps']} steps in {summary['seconds']:.1f} s",
                      f"final loss {summary['final_loss']:.4f}", *extra, skipped])


def _plot(metrics: MetricsWriter, run_dir: str) -> None:
    """loss.png beside metrics.jsonl; a plotting problem never fails a finished run."""
    from openspeed.training.plotting import plot_losses

    try:
        plot_losses(metrics.path, os.path.join(run_dir, "loss.png"))
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded
        print(f"note: could not draw loss.png ({exc})", file=sys.stderr)


def _gather_skipped(skipped: dict[int, str], group) -> dict[int, str]:
    """Union of every dp rank's skipped samples (index -> reason)."""
    gathered = comm.all_gather_objects(skipped, group=group)
    union: dict[int, str] = {}
    for part in gathered:
        union.update(part)
    return union


__all__ = ["run_training", "resume_run", "run_summary", "stop_early", "summary_line"]
