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

from openspeed.accelerator import destroy_distributed, get_accelerator, init_distributed
from openspeed.config import RunConfig, dump_yaml, resolve_layout
from openspeed.data.loader import step_batches
from openspeed.data.schedule import GlobalBatchSchedule
from openspeed.distributed.context_parallel.modules import suspended as cp_suspended
from openspeed.distributed.fsdp import gathered_parameters, set_gradient_sync
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
from openspeed.lora import adapter_view
from openspeed.lora.training import build_lora_training_model
from openspeed.memory import adaptive_recompute, max_over_ranks, measure_layers, optimizer_state_bytes
from openspeed.memory.adaptive import GB
from openspeed.ops.level import set_optimization_level
from openspeed.tasks.vlm_sft import VLMTask
from openspeed.training import checkpoint as ckpt
from openspeed.training.grads import clip_grad_norm
from openspeed.training.metrics import MetricsWriter, Progress
from openspeed.training.model_setup import build_training_model
from openspeed.training.optim import Optimizers
from openspeed.training.profiling import StepProfiler


class _StopFlag:
    """Set by SIGTERM: the loop saves a checkpoint after the current step and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.requested = True


def _all_reduce(*values: float, group) -> list[float]:
    """Sum each value over ``group`` in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def _rng_state(acc) -> dict:
    return {"torch": acc.rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _restore_rng(acc, state: dict) -> None:
    acc.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


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
) -> tuple[int, str | None]:
    """Load the checkpoint ``train.resume`` names (``auto``: the latest complete one in the run dir).

    Restores model parts, their optimizers (``per_part``, default ``optim.per_part``; ``None`` for a
    part without one), the LR schedule, the skipped-sample record and the RNG state;
    returns ``(start_step, checkpoint path or None)``. Rank 0 says what it resumed from, or that the
    checkpoint is already at ``train.max_steps``.
    """
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = ckpt.latest_checkpoint(cfg.train.run_dir)
    elif cfg.train.resume != "none":
        resume_from = cfg.train.resume
    if not resume_from:
        return 0, None
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
    return start_step, resume_from


def _any_rank(flag: bool) -> bool:
    """True when ``flag`` holds on some rank (pipeline stages hold different parameters)."""
    return _all_reduce(1.0 if flag else 0.0, group=None)[0] > 0


def _check_pipeline(cfg: RunConfig, sizes: dict[str, int], n_micro: int) -> None:
    """Pipeline settings the model and schedule can honour, checked before anything is built."""
    from openspeed.training.model_setup import model_config_from_run

    spec, config = model_config_from_run(cfg)
    if spec.pipeline is None:
        raise ConfigError(f"parallel.pp={sizes['pp']}: {spec.name} has no pipeline plan")
    check_pipeline_config(sizes["pp"], cfg.parallel.virtual_stages, cfg.parallel.pp_schedule, n_micro)
    spec.pipeline.check(config, sizes["pp"] * cfg.parallel.virtual_stages, cfg.parallel.pipeline_num_layers)


def run_training(cfg: RunConfig) -> dict:
    """Train as ``cfg`` says; returns a summary dict (rank 0's view)."""
    acc = get_accelerator()
    acc.configure_math()
    if cfg.train.cpu_threads is not None and acc.device_type == "cpu":
        if cfg.train.cpu_threads < 1:
            raise ConfigError(f"train.cpu_threads must be >= 1, got {cfg.train.cpu_threads}")
        torch.set_num_threads(cfg.train.cpu_threads)
    set_optimization_level(cfg.train.optimization_level)
    rank, world = init_distributed()
    try:
        return _train(cfg, acc, rank, world)
    finally:
        destroy_distributed()


def _train(cfg: RunConfig, acc, rank: int, world: int) -> dict:
    sizes = resolve_layout(cfg, world)
    check_supported(cfg, sizes)
    dims = build_mesh(sizes, acc.device_type, cfg.parallel.cp_algo, cfg.parallel.cp_ulysses_degree)
    if sizes["cp"] > 1:
        try:
            cp = dims.context_parallel()
        except ConfigError as exc:
            raise ConfigError(f"parallel.cp_algo={cfg.parallel.cp_algo}: {exc}") from None
    dp_group, dp_rank, dp_size = dims.dp_group(), dims.dp_rank(), dims.dp_size
    loss_group = dims.loss_group()  # each cp rank's loss covers its share of the tokens
    is_main = rank == 0
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_all(acc, cfg.train.seed + rank)

    run_dir = cfg.train.run_dir
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))

    task = VLMTask(cfg)
    if sizes["cp"] > 1:
        # Every batch's length must split evenly over the cp layout (zigzag chunks for ring / hybrid).
        task.collator.pad_to_multiple_of = math.lcm(task.collator.pad_to_multiple_of or 1, cp.seq_multiple)
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
    if sizes["pp"] > 1:
        _check_pipeline(cfg, sizes, n_micro)
    if cfg.model.lora.rank > 0:
        # LoRA: only the adapters train, and checkpoints hold only them (and their optimizer state);
        # the frozen base is rebuilt from model.path / train.seed on resume and export.
        parts, spec, config, adapted = build_lora_training_model(cfg, dims, acc.device)
        saved_parts = [adapter_view(part) for part in parts]
    else:
        parts, spec, config = build_training_model(cfg, dims, acc.device)
        adapted, saved_parts = [], parts
    trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
    if not _any_rank(bool(trainable)):
        raise ConfigError(f"model.freeze={cfg.model.freeze} leaves no trainable parameters")
    if adapted and is_main:
        print(f"LoRA rank {cfg.model.lora.rank} on {len(adapted)} linear layers: only the adapters train",
              file=sys.stderr)
    optim = Optimizers(parts, cfg.optim, cfg.train.max_steps, cfg.memory)
    pipe = None
    if sizes["pp"] > 1:
        packer = spec.pipeline.packer(config, cfg.data.max_seq_len, task.processor.pad_token_id,
                                      cfg.train.micro_batch_size)
        pipe = build_pipeline(parts, dims, acc.device, cfg.parallel.pp_schedule, n_micro, spec.pipeline.loss,
                              packer)
        model = PipelineInferenceModel(pipe)  # evaluation and decoding through the stages
        if any(is_vocab_parallel(part) for part in parts):
            mark_vocab_parallel(model)
    else:
        model = parts[0]
    norm_group = pipe.group if pipe is not None else None
    norm_skip = norm_exclusions(pipe) if pipe is not None else []

    # ---------------------------------------------------------------- resume
    start_step, resume_from = resume_run(cfg, acc, rank, saved_parts, optim, task)
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
        ckpt.save_checkpoint(
            checkpoint_root,
            step,
            saved_parts,
            optim.per_part,
            {"scheduler": optim.scheduler_state(), "skipped": {str(i): r for i, r in skipped.items()}, "seed": cfg.train.seed},
            _rng_state(acc),
            keep_last=cfg.checkpoint.keep_last,
        )
        last_saved = step

    profiler = StepProfiler(cfg.profile, rank, run_dir)
    last_eval: dict = {}
    step = start_step
    adaptive = None
    if cfg.memory.budget_gb is not None:
        if pipe is not None:
            raise ConfigError("memory.budget_gb (adaptive recompute) is not available with parallel.pp > 1 yet")
        adaptive = _AdaptiveRecompute(spec.memory_plan(model))

    def count_flops(batch: dict) -> None:
        batch["flops"] = task.flops(spec, config, batch)

    loader = step_batches(task, schedule, start_step + 1, cfg.train.max_steps, dp_rank, dp_size,
                          cfg.train.micro_batch_size, cfg.data.num_workers, annotate=count_flops)
    compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else acc.peak_flops(compute_dtype)
    for step, (batches, skips) in zip(range(start_step + 1, cfg.train.max_steps + 1), loader):
        profiler.before_step(step)
        t0 = time.perf_counter()
        task.skipped.update(skips)
        targets, tokens, flops = _all_reduce(sum(task.count_targets(b) for b in batches),
                                             sum(task.count_tokens(b) for b in batches),
                                             sum(b["flops"] for b in batches), group=dp_group)

        if pipe is not None:
            with acc.autocast(cfg.train.precision), loss_context(model):
                loss_sum = pipeline_train_step(pipe, batches, int(targets))
            sync_tied_grads(pipe)
        else:
            loss_sum = torch.zeros((), dtype=torch.float64)
            for i, batch in enumerate(batches):
                set_gradient_sync(model, i == len(batches) - 1)
                batch = task.to_device(batch, acc.device)
                with acc.autocast(cfg.train.precision), loss_context(model):
                    if adaptive is not None and adaptive.report is None:
                        adaptive.report, loss = measure_layers(
                            model, adaptive.plan, lambda b=batch, n=int(targets): task.loss(model, b, n)
                        )
                    else:
                        loss = task.loss(model, batch, int(targets))
                    loss.backward()
                loss_sum += plain_tensor(loss).detach().double().cpu()
        dist.all_reduce(loss_sum, group=loss_group)
        grad_norm = clip_grad_norm(trainable, cfg.train.grad_clip, norm_group, norm_skip)
        lr = optim.lr
        if math.isfinite(grad_norm):
            optim.step()
        elif is_main:
            progress.write(f"step {step}: non-finite gradient norm, update skipped")
        optim.schedule_step()
        optim.zero_grad()
        if adaptive is not None and adaptive.choice is None:
            choice = adaptive.decide(model, optim, cfg.memory.budget_gb)
            metrics.log({"step": step, "adaptive_recompute": choice.recompute,
                         "adaptive_offload": choice.offload,
                         "adaptive_estimated_gb": choice.estimated_bytes / GB})
            progress.write(
                f"memory.budget_gb={cfg.memory.budget_gb}: recomputing {len(choice.recompute)} layers, "
                f"estimated {choice.estimated_bytes / GB:.4f} GB (measured {choice.measured_bytes / GB:.4f} GB)"
            )
        acc.synchronize()
        elapsed = time.perf_counter() - t0
        last_loss = loss_sum.item()
        record = {
            "step": step,
            "loss": last_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "target_tokens": int(targets),
            "step_time_s": elapsed,
        }
        # Model FLOPs of the whole step shared over every rank: the achieved rate per device.
        per_device = flops / world / elapsed if elapsed > 0 else 0.0
        record["tflops"] = per_device / 1e12
        record["mfu"] = per_device / peak
        metrics.log(record)
        progress.update(last_loss, lr, record["tokens_per_s"], record["mfu"])
        trace = profiler.after_step(step)
        if trace:
            progress.write(f"profiler trace written to {trace}")

        if task.val_set is not None and cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
            loader.wait()  # the next step's loading shares the tokenizer and processor
            with cp_suspended():  # validation runs every cp rank on whole sequences
                record, scores = evaluate(cfg, task, model, acc, dp_group, dp_rank, dp_size)
            last_eval = {"step": step, "record": record, "scores": scores}
            metrics.log({"step": step, **record})
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            save(step)
        stopped = stop_early(cfg, stop, step, start_step, save, last_saved == step, loader, progress, metrics,
                             run_dir, is_main)
        if stopped is not None:
            return stopped

    loader.close()
    progress.close()
    final_eval, final_scores = {}, None
    if task.val_set is not None and step > start_step:
        if last_eval.get("step") == step:
            final_eval, final_scores = last_eval["record"], last_eval["scores"]
        else:
            with cp_suspended():
                final_eval, final_scores = evaluate(cfg, task, model, acc, dp_group, dp_rank, dp_size)
            metrics.log({"step": step, **final_eval})
    if cfg.checkpoint.save_final and last_saved != step and step > start_step:
        save(step)
    held_out = None
    if final_scores is not None and cfg.train.eval_blank_images:
        # The real-image answers are the final validation's; only the blank-image pass is new.
        indices = _eval_indices(cfg, task.val_set)
        real = final_scores
        with cp_suspended():
            blank = vqa_scores(cfg, task, model, acc, dp_group, dp_rank, dp_size, indices, blank_images=True)
        held_out = {"real": real, "blank": blank}
        metrics.log({"step": step, "heldout_accuracy": real["accuracy"], "heldout_per_type": real["per_type"],
                     "heldout_chance": real["chance_accuracy"], "heldout_blank_accuracy": blank["accuracy"],
                     "heldout_n": real["n"]})
    seconds = time.perf_counter() - train_start
    summary = run_summary(task.skipped, dp_group, metrics, is_main, step, start_step, last_loss, seconds)
    summary.update(final_eval)
    if is_main:
        extra = [f"val_loss {final_eval['val_loss']:.4f}"] if final_eval else []
        print(summary_line(summary, extra), file=sys.stderr)
        _plot(metrics, run_dir)
        if held_out is not None:
            real, blank = held_out["real"], held_out["blank"]
            for qtype in sorted(real["per_type"]):
                print(f"  {qtype:<10} accuracy {real['per_type'][qtype]:.3f} "
                      f"(blank-image {blank['per_type'].get(qtype, 0.0):.3f}, n={real['per_type_n'][qtype]})",
                      flush=True)
            print(f"held-out accuracy: {real['accuracy']:.3f} (chance {real['chance_accuracy']:.3f}, "
                  f"blank-image {blank['accuracy']:.3f}, n={real['n']}, {seconds:.0f} s)", flush=True)
            summary.update(heldout_accuracy=real["accuracy"], heldout_blank_accuracy=blank["accuracy"],
                           heldout_chance=real["chance_accuracy"], heldout_n=real["n"])
    metrics.close()
    return summary


def stop_early(cfg: RunConfig, stop: _StopFlag, step: int, start_step: int, save, saved: bool, loader,
               progress, metrics: MetricsWriter, run_dir: str, is_main: bool) -> dict | None:
    """Save and wind the run down after ``step`` when SIGTERM reached any rank or ``train.exit_interval``
    divides the step (before the last step); returns the run's result then, else None.

    Collective (one all-reduce): every rank calls it after every step. ``save(step)`` writes the
    step's checkpoint, unless ``saved`` says it was just written.
    """
    exit_now = bool(cfg.train.exit_interval) and step % cfg.train.exit_interval == 0
    stop_now = _all_reduce(1.0 if stop.requested else 0.0, group=None)[0] > 0
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
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, skipped, group=group)
    union: dict[int, str] = {}
    for part in gathered:
        union.update(part)
    return union


@torch.no_grad()
def evaluate(cfg: RunConfig, task: VLMTask, model, acc, dp_group, dp_rank: int,
             dp_size: int) -> tuple[dict, dict]:
    """Validation: token-mean loss and greedy-decoding exact-match accuracy.

    Returns the metrics record and the full accuracy scores (per type, chance) they came from.

    The loss pass runs the same number of batches on every rank (sharded forwards need all ranks);
    decoding runs with the parameters gathered, so each rank answers its share at its own pace.
    """
    dataset = task.val_set
    indices = _eval_indices(cfg, dataset)
    mbs = cfg.train.micro_batch_size
    per_round = mbs * dp_size
    rounds = math.ceil(len(indices) / per_round)
    was_training = model.training
    model.eval()
    loss_sum, targets = 0.0, 0
    for r in range(rounds):
        chunk = indices[r * per_round : (r + 1) * per_round]
        mine = chunk[dp_rank * mbs : (dp_rank + 1) * mbs]
        batch = task.load_batch(dataset, mine)
        count = task.count_targets(batch)
        batch = task.to_device(batch, acc.device)
        with acc.autocast(cfg.train.precision), loss_context(model):
            loss = task.loss(model, batch, 1)  # a plain sum over this batch's target tokens
        loss_sum += float(plain_tensor(loss))
        targets += count
    if was_training:
        model.train()
    total, count = _all_reduce(loss_sum, targets, group=dp_group)
    scores = vqa_scores(cfg, task, model, acc, dp_group, dp_rank, dp_size, indices)
    result = {"val_loss": total / max(1.0, count), "val_target_tokens": int(count),
              "val_accuracy": scores["accuracy"], "val_accuracy_n": scores["n"]}
    return result, scores


def _eval_indices(cfg: RunConfig, dataset) -> list[int]:
    n = len(dataset)
    if cfg.train.eval_max_samples is not None:
        n = min(n, cfg.train.eval_max_samples)
    return list(range(n))


@torch.no_grad()
def vqa_scores(cfg: RunConfig, task: VLMTask, model, acc, dp_group, dp_rank: int, dp_size: int,
               indices: list[int], blank_images: bool = False) -> dict:
    """Greedy answers to the validation questions at ``indices``, scored on every rank."""
    from openspeed.eval.vqa import chance_accuracy, evaluate_vqa, score_predictions

    mine = indices[dp_rank::dp_size]
    with gathered_parameters(model, cfg.parallel.zero_stage), acc.autocast(cfg.train.precision):
        local = evaluate_vqa(model, task.processor, task.val_set, mine,
                             batch_size=max(8, cfg.train.micro_batch_size), blank_images=blank_images)
    parts: list = [None] * dp_size
    keep = ("predictions", "answers", "qtypes", "skipped")
    dist.all_gather_object(parts, {k: local[k] for k in keep}, group=dp_group)
    predictions = [p for part in parts for p in part["predictions"]]
    answers = [a for part in parts for a in part["answers"]]
    qtypes = [q for part in parts for q in part["qtypes"]]
    scores = score_predictions(predictions, answers, qtypes)
    scores["chance_accuracy"] = chance_accuracy(answers, qtypes)
    scores["skipped"] = sum(part["skipped"] for part in parts)
    return scores


__all__ = ["run_training", "evaluate"]
