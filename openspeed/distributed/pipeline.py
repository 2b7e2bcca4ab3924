"""Pipeline parallelism on ``torch.distributed.pipelining``: stages, schedules, one training step.

Model-agnostic: a model's pipeline plan (e.g. :mod:`openspeed.models.qwen2_5_vl.pipeline`) provides
the stage modules and a *packer* that turns the trainer's micro-batch dicts into the first stage's
positional inputs (stacked along dim 0) and the stacked labels.

Trainer order::

    check_pipeline_config(pp, virtual_stages, schedule, n_microbatches)     # early, one-line errors
    parts = plan.stage_modules_for_rank(meta_model, dims, cfg.parallel)      # meta, original names
    for m in parts: apply_fsdp(m, dp_mesh, m.fsdp_blocks(), ...)             # if dp > 1
    for m in parts: m.to_empty(device); reset_buffers(m); init_weights(m, seed, std)
    pipe = build_pipeline(parts, dims, device, schedule, n_microbatches, plan.stage_loss,
                          plan.Qwen2_5_VLPipelinePacker(config, max_seq_len, pad_id, mbs))
    optimizer over the parameters of all ``parts``
    per step:
        loss = pipeline_train_step(pipe, micro_batches, num_items=global_target_tokens)
        sync_tied_grads(pipe)
        grad_norm = clip_grad_norm(params, max_norm, pipe.group, norm_exclusions(pipe))  # training/grads.py
        optimizer.step(); optimizer.zero_grad()

Variable-size vision inputs: ``schedule.step`` splits each input along dim 0 into
``n_microbatches`` equal chunks. The packer therefore pads every micro-batch's tokens to a fixed
``(micro_batch_size, seq_len)`` and zero-pads the packed patch tensors (a different length in each
micro-batch) into ``(n_microbatches, max_patches, patch_dim)`` with their grids, so chunk ``i`` is
exactly micro-batch ``i``; the first stage strips the padding again. Only public pipelining API is
used (``PipelineStage``, ``Schedule*``, ``step(..., target=, losses=)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from openspeed.distributed import comm
from openspeed.distributed.tensor_parallel import full_logits, plain_tensor
from openspeed.errors import ConfigError

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "dualpipev")

Packer = Callable[[Sequence[dict[str, Any]]], tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]


# --------------------------------------------------------------------------------------------------
# Stage placement and config checks
# --------------------------------------------------------------------------------------------------


def placement_style(schedule: str, virtual_stages: int) -> str:
    """``"v"`` for the V-shaped schedules (DualPipeV, ZBV zero bubble), else ``"loop"``."""
    if schedule == "dualpipev" or (schedule == "zero_bubble" and virtual_stages == 2):
        return "v"
    return "loop"


def stage_to_rank(pp: int, num_stages: int, style: str = "loop") -> dict[int, int]:
    """Pipeline rank of every stage: round-robin (``loop``) or down-and-back (``v``).

    With ``v`` and two stages per rank, rank ``r`` holds stages ``r`` and ``2*pp - 1 - r``, so the
    first and the last stage are both on rank 0.
    """
    if style == "loop":
        return {s: s % pp for s in range(num_stages)}
    mapping = {}
    for s in range(num_stages):
        lap, pos = divmod(s, pp)
        mapping[s] = pos if lap % 2 == 0 else pp - 1 - pos
    return mapping


def local_stage_indices(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stage indices rank ``pp_rank`` of the pipeline holds, in increasing order."""
    num_stages = pp * virtual_stages
    mapping = stage_to_rank(pp, num_stages, placement_style(schedule, virtual_stages))
    return [s for s in range(num_stages) if mapping[s] == pp_rank]


def check_pipeline_config(pp: int, virtual_stages: int, schedule: str, n_microbatches: int) -> None:
    """Raise a one-line ``ConfigError`` for a layout the schedule cannot run."""
    key = f"parallel.pp_schedule={schedule}"
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule: unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})"
        )
    if pp < 2:
        raise ConfigError(f"parallel.pp={pp}: pipeline parallel needs at least 2 pipeline ranks")
    if virtual_stages < 1:
        raise ConfigError(f"parallel.virtual_stages: must be at least 1, got {virtual_stages}")
    num_stages = pp * virtual_stages
    if schedule in ("1f1b", "gpipe") and virtual_stages != 1:
        raise ConfigError(
            f"{key} runs one stage per rank, got parallel.virtual_stages={virtual_stages} "
            "(use interleaved_1f1b, zero_bubble or dualpipev for virtual stages)"
        )
    if schedule == "1f1b" and n_microbatches < pp:
        raise ConfigError(
            f"{key} needs at least pp={pp} micro-batches per step, got {n_microbatches} "
            "(raise train.global_batch_size or lower train.micro_batch_size)"
        )
    if schedule in ("interleaved_1f1b", "zero_bubble") and virtual_stages < 2:
        raise ConfigError(f"{key} needs parallel.virtual_stages >= 2, got {virtual_stages}")
    if schedule == "interleaved_1f1b" or (schedule == "zero_bubble" and virtual_stages > 2):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(
                f"{key} needs the {n_microbatches} micro-batches per step to be a multiple of "
                f"{rounds} (rounds of pp={pp}); use a multiple of pp or fewer than 2*pp"
            )
    if schedule == "dualpipev":
        if virtual_stages != 2:
            raise ConfigError(
                f"{key} needs parallel.virtual_stages=2 (a V of two stages per rank), got {virtual_stages}"
            )
        if n_microbatches < num_stages:
            raise ConfigError(
                f"{key} needs at least as many micro-batches per step ({n_microbatches}) as stages "
                f"(pp*virtual_stages = {num_stages})"
            )


# --------------------------------------------------------------------------------------------------
# Loss and the pipeline object
# --------------------------------------------------------------------------------------------------


class NormalizedLoss:
    """``loss_fn(output, target, num_items)``: summed token loss / the global target count.

    The trainer sets ``num_items`` every step (label tokens over all micro-batches and data-parallel
    ranks), so micro-batch losses and gradients simply add up; schedules are built with
    ``scale_grads=False``.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.num_items: int | torch.Tensor = 1

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Under tensor parallel the loss of vocab-sharded logits is a replicated DTensor.
        return plain_tensor(self.loss_fn(output, target, self.num_items))


@dataclass
class Pipeline:
    """This rank's part of the pipeline and everything a step needs."""

    modules: list[nn.Module]  # this rank's stage modules, in stage order (the "model parts")
    stage_indices: list[int]
    num_stages: int
    stages: list[PipelineStage]
    schedule: Any
    schedule_name: str
    n_microbatches: int
    loss: NormalizedLoss
    packer: Packer
    group: dist.ProcessGroup
    stage_ranks: dict[int, int]  # stage index -> rank within ``group``
    device: torch.device
    tied_group: dist.ProcessGroup | None = None
    tied_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def global_rank(self, stage_index: int) -> int:
        return dist.get_global_rank(self.group, self.stage_ranks[stage_index])

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


def _tied_group(dims, pp_size: int, first_rank: int, last_rank: int) -> dist.ProcessGroup | None:
    """The group of the two ranks holding the first and the last stage, for this rank's pipeline.

    Every rank creates every pipeline's group (in the same order), as ``new_group`` requires.
    """
    if first_rank == last_rank:
        return None
    mesh = dims.mesh
    pp_dim = mesh.mesh_dim_names.index("pp")
    rows = mesh.mesh.movedim(pp_dim, -1).reshape(-1, pp_size).tolist()
    pairs = [sorted((row[first_rank], row[last_rank])) for row in rows]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


def build_schedule(stages: list[PipelineStage], name: str, n_microbatches: int, loss: Callable):
    """The schedule called ``name`` over this rank's ``stages`` (``scale_grads=False``)."""
    kwargs = dict(loss_fn=loss, scale_grads=False)
    try:
        if name == "gpipe":
            return ScheduleGPipe(stages[0], n_microbatches, **kwargs)
        if name == "1f1b":
            return Schedule1F1B(stages[0], n_microbatches, **kwargs)
        if name == "interleaved_1f1b":
            return ScheduleInterleaved1F1B(stages, n_microbatches, **kwargs)
        if name == "zero_bubble":
            cls = ScheduleZBVZeroBubble if len(stages) == 2 else ScheduleInterleavedZeroBubble
            return cls(stages, n_microbatches, **kwargs)
        if name == "dualpipev":
            return ScheduleDualPipeV(stages, n_microbatches, **kwargs)
    except ValueError as exc:  # a layout torch refuses that check_pipeline_config did not foresee
        raise ConfigError(f"parallel.pp_schedule={name}: {exc}") from None
    raise ConfigError(f"parallel.pp_schedule: unknown schedule '{name}' (choose from {', '.join(SCHEDULES)})")


def build_pipeline(
    modules: Sequence[nn.Module],
    dims,
    device: torch.device | str,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    packer: Packer,
) -> Pipeline:
    """Wrap this rank's stage modules in ``PipelineStage``s over the mesh's ``pp`` dim and build the schedule.

    ``modules`` are this rank's stage modules (each with ``stage_index`` and ``num_stages``, already
    sharded/materialised/initialised; optionally ``tied_parameters()`` and ``tie_word_embeddings``),
    in increasing stage order. ``loss_fn(logits, labels, num_items)`` is wrapped in a
    :class:`NormalizedLoss`. ``packer(micro_batches) -> (first-stage args, labels)`` pads to the fixed
    training shapes; ``packer.for_inference(batch)`` packs one batch as it is (used by
    :func:`pipeline_forward_logits`). Collective: every rank calls it (tied-embedding groups).
    """
    modules = list(modules)
    pp_mesh = dims.mesh["pp"]
    group = pp_mesh.get_group()
    pp_size = dims.sizes["pp"]
    pp_rank = pp_mesh.get_local_rank()
    num_stages = modules[0].num_stages
    virtual_stages = num_stages // pp_size
    check_pipeline_config(pp_size, virtual_stages, schedule, n_microbatches)
    indices = [m.stage_index for m in modules]
    expected = local_stage_indices(pp_rank, pp_size, virtual_stages, schedule)
    if indices != expected:
        raise ValueError(f"pipeline rank {pp_rank} holds stages {indices}, {schedule} places {expected} here")
    device = torch.device(device)
    stages = [PipelineStage(m, m.stage_index, num_stages, device, group=group) for m in modules]
    loss = NormalizedLoss(loss_fn)
    sched = build_schedule(stages, schedule, n_microbatches, loss)
    ranks = stage_to_rank(pp_size, num_stages, placement_style(schedule, virtual_stages))

    tied_params = [p for m in modules for p in getattr(m, "tied_parameters", list)()]
    # Every stage module carries the model config: all ranks agree on whether there is a tie.
    tied = any(getattr(m, "tie_word_embeddings", False) for m in modules)
    tied_group = _tied_group(dims, pp_size, ranks[0], ranks[num_stages - 1]) if tied else None
    return Pipeline(
        modules=modules,
        stage_indices=indices,
        num_stages=num_stages,
        stages=stages,
        schedule=sched,
        schedule_name=schedule,
        n_microbatches=n_microbatches,
        loss=loss,
        packer=packer,
        group=group,
        stage_ranks=ranks,
        device=device,
        tied_group=tied_group,
        tied_params=tied_params,
    )


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def pipeline_train_step(
    pipe: Pipeline, microbatches: Sequence[dict[str, Any]], num_items: int | float
) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches through the schedule.

    ``microbatches`` are the trainer's collated dicts (any pixel counts, any lengths up to the
    packer's ``seq_len``, at most ``micro_batch_size`` rows); there must be ``pipe.n_microbatches``
    of them. ``num_items`` is the step's global target-token count. Gradients accumulate into the
    stage modules' ``.grad`` (reduced over data parallel by FSDP on the last micro-batch). Returns
    the step's summed loss (this data-parallel rank's share: sum of micro-batch losses) as a float32
    scalar on the device, the same on every pipeline rank. Wrap the call in autocast for mixed precision.
    """
    if len(microbatches) != pipe.n_microbatches:
        raise ValueError(
            f"the pipeline schedule was built for {pipe.n_microbatches} micro-batches, got {len(microbatches)}"
        )
    pipe.loss.num_items = max(1, num_items)
    args, labels = pipe.packer(microbatches)
    step_args = tuple(a.to(pipe.device) for a in args) if pipe.has_first else ()
    target = None
    if pipe.has_last:
        if labels is None:
            raise ValueError("pipeline training needs labels in every micro-batch")
        target = labels.to(pipe.device)
    losses: list[torch.Tensor] = []
    pipe.schedule.step(
        *step_args, target=target, losses=losses if pipe.has_last else None, return_outputs=False
    )
    total = torch.zeros((), dtype=torch.float32, device=pipe.device)
    if pipe.has_last:
        total += sum(loss.detach().float() for loss in losses)
    return comm.broadcast(total, src=pipe.global_rank(pipe.num_stages - 1), group=pipe.group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sync_tied_grads(pipe: Pipeline) -> None:
    """Sum the gradients of the tied embedding's copies (first and last stage) into both copies.

    Call after :func:`pipeline_train_step`, before clipping. A no-op without tied embeddings. Under
    FSDP each rank sums its own shard (both copies are sharded the same way over data parallel).
    """
    if not pipe.tied_params and pipe.tied_group is None:
        return
    grads = []
    for p in pipe.tied_params:
        if not p.requires_grad:  # frozen: frozen on every rank, so every rank skips it
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(_local(p.grad))
    if not grads:
        return
    total = grads[0].clone()
    for g in grads[1:]:
        total += g
    if pipe.tied_group is not None:
        comm.all_reduce(total, group=pipe.tied_group)
    for g in grads:
        g.copy_(total)


def norm_exclusions(pipe: Pipeline) -> list[nn.Parameter]:
    """Parameters to leave out of a gradient norm: the last stage's copy of the tied embedding.

    After :func:`sync_tied_grads` both copies hold the full model's gradient; counting it once
    gives the full model's norm. (Pass these as ``exclude_from_norm`` to a norm helper of your own.)
    """
    last = pipe.num_stages - 1
    out: list[nn.Parameter] = []
    for module in pipe.modules:
        if module.stage_index == last and module.stage_index != 0:
            out += getattr(module, "tied_parameters", list)()
    return out


# --------------------------------------------------------------------------------------------------
# Forward without a schedule (evaluation, greedy decoding)
# --------------------------------------------------------------------------------------------------

def _run_stages(pipe: Pipeline, batch: dict[str, Any]) -> torch.Tensor | None:
    """One forward through all stages with explicit send/recv; the last stage's output where it runs."""
    args = None
    if pipe.has_first:
        packed, _ = pipe.packer.for_inference(batch)  # type: ignore[attr-defined]
        args = tuple(a.to(pipe.device) for a in packed)
    out: Any = None
    result = None
    for module in pipe.modules:
        s = module.stage_index
        if s == 0:
            inputs = args
        elif pipe.stage_ranks[s - 1] == pipe.stage_ranks[s]:
            inputs = out  # the previous stage ran just before, on this rank
        else:
            inputs = tuple(comm.recv_tensors(pipe.global_rank(s - 1), pipe.group, pipe.device))
        out = module(*inputs)
        if s == pipe.num_stages - 1:
            result = out
        elif pipe.stage_ranks[s + 1] != pipe.stage_ranks[s]:
            comm.send_tensors(out, pipe.global_rank(s + 1), pipe.group, pipe.device)
    return result


@torch.no_grad()
def pipeline_forward_logits(
    pipe: Pipeline, batch: dict[str, Any], positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of ``batch`` through the pipeline, returned on every pipeline rank.

    No schedule: the stages run one after another with explicit send/recv over the pipeline group
    (shapes are sent first), so any batch size and sequence length works, e.g. one call per
    generated token. Every pipeline rank must call it with the same ``batch`` (all of them have it:
    they share the data-parallel rank). ``positions`` (batch,) optionally picks one column per row,
    returning (batch, vocab) instead of (batch, seq, vocab) and broadcasting only that.
    """
    logits = _run_stages(pipe, batch)
    if logits is not None:
        logits = full_logits(logits)
    if logits is not None and positions is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits = logits[rows, positions.to(logits.device)]
    return comm.broadcast_tensor(logits, pipe.global_rank(pipe.num_stages - 1), pipe.group, pipe.device)


@torch.no_grad()
def pipeline_forward_loss(
    pipe: Pipeline, batch: dict[str, Any], num_items: int | float | None = None
) -> torch.Tensor:
    """The loss of one batch (``loss_fn(logits, labels, num_items)``), on every pipeline rank.

    Only the scalar is broadcast. As for the model: ``num_items=None`` gives the mean over the
    batch's target tokens, ``num_items=1`` their plain sum.
    """
    logits = _run_stages(pipe, batch)
    loss = torch.zeros((), dtype=torch.float32, device=pipe.device)
    if logits is not None:
        loss = plain_tensor(pipe.loss.loss_fn(logits, batch["labels"].to(logits.device), num_items))
        loss = loss.float().reshape(())
    comm.broadcast(loss, src=pipe.global_rank(pipe.num_stages - 1), group=pipe.group)
    return loss


@dataclass
class PipelineOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class PipelineInferenceModel(nn.Module):
    """Model-like front for evaluation code that calls ``model(**inputs)``.

    ``model(input_ids=..., ..., labels=None)`` returns ``.logits`` from :func:`pipeline_forward_logits`;
    with ``labels`` it returns ``.loss`` from :func:`pipeline_forward_loss` (``num_items_in_batch``
    as the divisor) and no logits. ``eval()``/``train()`` reach the stage modules.
    """

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.pipe = pipe
        self.parts = nn.ModuleList(pipe.modules)

    def forward(
        self, labels: torch.Tensor | None = None, num_items_in_batch=None, return_logits: bool = True,
        **inputs,
    ) -> PipelineOutput:
        batch = {k: v for k, v in inputs.items() if v is not None}
        if labels is not None:
            batch["labels"] = labels
            return PipelineOutput(
                logits=None, loss=pipeline_forward_loss(self.pipe, batch, num_items_in_batch)
            )
        return PipelineOutput(logits=pipeline_forward_logits(self.pipe, batch))


__all__ = [
    "SCHEDULES",
    "NormalizedLoss",
    "Pipeline",
    "PipelineInferenceModel",
    "PipelineOutput",
    "build_pipeline",
    "build_schedule",
    "check_pipeline_config",
    "local_stage_indices",
    "norm_exclusions",
    "pipeline_forward_logits",
    "pipeline_forward_loss",
    "pipeline_train_step",
    "placement_style",
    "stage_to_rank",
    "sync_tied_grads",
]
