"""Vision-language supervised fine-tuning: conversations in, next-token loss on assistant replies.

Evaluation: token-mean validation loss and greedy-decoding exact-match accuracy; at the end of a run
with ``train.eval_blank_images`` the same questions with blank images (the control that shows the
answers come from the images).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from openspeed.config import RunConfig
from openspeed.distributed import comm
from openspeed.distributed.context_parallel.modules import suspended as cp_suspended
from openspeed.distributed.fsdp import gathered_parameters
from openspeed.distributed.tensor_parallel import loss_context, plain_tensor
from openspeed.errors import BadSampleError, DataError
from openspeed.tasks.base import EvalContext
from openspeed.tasks.samples import usable_samples

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
    "labels",
    "cu_seqlens",
)


class VLMTask:
    """Owns the processor, datasets and collator; turns sample indices into model batches.

    ``spec`` / ``model_config``: the model's (read from ``model.path`` when not given), for FLOPs.
    """

    count_name = "target_tokens"
    cp_splits_loss = True
    uneven_forwards = False

    def __init__(self, cfg: RunConfig, device: torch.device | None = None, model_config=None, spec=None):
        from openspeed.data.collator import VLCollator
        from openspeed.data.conversation import ConversationDataset
        from openspeed.data.processor import VLProcessor

        if model_config is None or spec is None:
            from openspeed.models.loading import model_config_from_run

            spec, model_config = model_config_from_run(cfg)
        self.cfg = cfg
        self.spec, self.model_config = spec, model_config
        self.device = device or torch.device("cpu")
        self.processor = VLProcessor.from_pretrained(cfg.model.path)
        self.train_set = ConversationDataset(cfg.data.train_path, self.processor, cfg.data.max_seq_len)
        self.val_set = (
            ConversationDataset(cfg.data.val_path, self.processor, cfg.data.max_seq_len)
            if cfg.data.val_path
            else None
        )
        if len(self.train_set) == 0:
            raise DataError(f"data.train_path: no records in {cfg.data.train_path}")
        # data.packing: each micro-batch becomes one row of back-to-back samples with cu_seqlens
        # (see VLCollator); the model keeps attention, positions and targets inside each sample.
        self.collator = VLCollator(
            pad_token_id=self.processor.pad_token_id,
            image_token_id=self.processor.image_token_id,
            video_token_id=self.processor.video_token_id,
            packing=cfg.data.packing,
        )
        # Training samples that could not be used: index -> reason. Each bad sample counts once,
        # however many epochs meet it.
        self.skipped: dict[int, str] = {}
        self._fallback: dict[int, Any] = {}

    # ------------------------------------------------------------------ batches

    def _masked_fallback(self, dataset) -> dict[str, Any]:
        """A real sample with every label masked: keeps all ranks in lock-step, adds nothing to the loss."""
        key = id(dataset)
        if key not in self._fallback:
            for index in range(len(dataset)):
                try:
                    sample = dataset[index]
                except BadSampleError:
                    continue
                sample = dict(sample)
                sample["labels"] = torch.full_like(sample["labels"], -100)
                self._fallback[key] = sample
                break
            else:
                raise DataError("no usable sample in the data set: every record was skipped")
        return self._fallback[key]

    def load_batch(self, dataset, indices: list[int], skips: dict[int, str] | None = None) -> dict[str, Any]:
        """Collate the usable samples among ``indices``; bad ones are skipped (and noted in ``skips``)."""
        samples = usable_samples(dataset, indices, skips)
        if not samples:
            samples = [self._masked_fallback(dataset)]
        return self.collator(samples)

    @staticmethod
    def count_targets(batch: dict[str, Any]) -> int:
        """Loss tokens of the batch (padded or packed: a segment's first token is never a target)."""
        from openspeed.data.collator import count_label_tokens

        return count_label_tokens(batch)

    @property
    def pad_token_id(self) -> int:
        return self.processor.pad_token_id

    def configure_context_parallel(self, cp) -> None:
        """Every batch's length must split evenly over the cp layout (zigzag chunks for ring / hybrid)."""
        self.collator.pad_to_multiple_of = math.lcm(self.collator.pad_to_multiple_of or 1, cp.seq_multiple)

    def annotate(self, batch: dict[str, Any]) -> None:
        """Count the batch's FLOPs where it is loaded (it reads the mask on the host)."""
        batch["flops"] = self.batch_flops(self.spec, self.model_config, batch)

    def flops(self, batch: dict[str, Any]) -> float:
        if "flops" not in batch:
            self.annotate(batch)
        return batch["flops"]

    def forwards(self, batch: dict[str, Any], step: int) -> list[dict[str, Any]]:
        return [batch]

    @staticmethod
    def batch_flops(spec, config, batch: dict[str, Any]) -> float:
        """Analytic training FLOPs of one batch (vision tower + LLM, attention included; ``spec.flops``).

        Attention is counted over each sample's real tokens: the rows of a padded batch, the
        segments of a packed one.
        """
        mask = batch["attention_mask"]
        cu_seqlens = batch.get("cu_seqlens")
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            lengths = [int(mask[0, a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            lengths = mask.sum(dim=1).tolist()
        lengths = [n for n in lengths if n > 0]
        ids = batch["input_ids"][mask.bool()]
        placeholders = int(((ids == config.image_token_id) | (ids == config.video_token_id)).sum())
        return float(spec.flops(config, int(sum(lengths)) - placeholders, batch.get("image_grid_thw"),
                                batch.get("video_grid_thw"), lengths))

    @staticmethod
    def count_tokens(batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens; a packed row's padding run has mask 0 too."""
        return int(batch["attention_mask"].sum())

    # ------------------------------------------------------------------ loss

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The batch's tensors on ``device``; from pinned memory (the loader's, on CUDA / NPU) the
        copies are asynchronous, so the training thread does not wait for them."""
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any], num_items: int, step: int = 0) -> torch.Tensor:
        """Sum of this batch's token losses divided by the global target count ``num_items``."""
        batch = self.to_device(batch, self.device)
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        out = model(**inputs, num_items_in_batch=max(1, num_items), return_logits=False)
        return out.loss

    # ------------------------------------------------------------------ evaluation

    def _eval_indices(self) -> list[int]:
        n = len(self.val_set)
        if self.cfg.train.eval_max_samples is not None:
            n = min(n, self.cfg.train.eval_max_samples)
        return list(range(n))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """Validation: token-mean loss and greedy-decoding exact-match accuracy (every cp rank on
        whole sequences).

        The loss pass runs the same number of batches on every rank (sharded forwards need all ranks);
        decoding runs with the parameters gathered, so each rank answers its share at its own pace.
        The record keeps the full scores under ``"scores"`` (not logged) for :meth:`final_report`.
        """
        cfg = self.cfg
        indices = self._eval_indices()
        mbs = cfg.train.micro_batch_size
        per_round = mbs * ctx.dp_size
        rounds = math.ceil(len(indices) / per_round)
        was_training = model.training
        model.eval()
        loss_sum, targets = torch.zeros((), dtype=torch.float32, device=comm.comm_device()), 0
        with cp_suspended():
            for r in range(rounds):
                chunk = indices[r * per_round : (r + 1) * per_round]
                mine = chunk[ctx.dp_rank * mbs : (ctx.dp_rank + 1) * mbs]
                batch = self.load_batch(self.val_set, mine)
                count = self.count_targets(batch)
                with ctx.acc.autocast(cfg.train.precision), loss_context(model):
                    loss = self.loss(model, batch, 1)  # a plain sum over this batch's target tokens
                loss_sum += plain_tensor(loss).detach().float().to(loss_sum.device)
                targets += count
            if was_training:
                model.train()
            total = float(comm.all_reduce(loss_sum, group=ctx.dp_group))
            (count,) = comm.sum_counts(targets, group=ctx.dp_group)
            scores = self.vqa_scores(model, ctx, indices)
        return {"val_loss": total / max(1.0, count), "val_target_tokens": int(count),
                "val_accuracy": scores["accuracy"], "val_accuracy_n": scores["n"], "scores": scores}

    @torch.no_grad()
    def vqa_scores(self, model: nn.Module, ctx: EvalContext, indices: list[int], blank_images: bool = False) -> dict:
        """Greedy answers to the validation questions at ``indices``, scored on every rank."""
        from openspeed.eval.vqa import chance_accuracy, evaluate_vqa, score_predictions

        cfg = self.cfg
        mine = indices[ctx.dp_rank::ctx.dp_size]
        with gathered_parameters(model, cfg.parallel.zero_stage), ctx.acc.autocast(cfg.train.precision):
            local = evaluate_vqa(model, self.processor, self.val_set, mine,
                                 batch_size=max(8, cfg.train.micro_batch_size), blank_images=blank_images)
        keep = ("predictions", "answers", "qtypes", "skipped")
        parts = comm.all_gather_objects({k: local[k] for k in keep}, group=ctx.dp_group)
        predictions = [p for part in parts for p in part["predictions"]]
        answers = [a for part in parts for a in part["answers"]]
        qtypes = [q for part in parts for q in part["qtypes"]]
        scores = score_predictions(predictions, answers, qtypes)
        scores["chance_accuracy"] = chance_accuracy(answers, qtypes)
        scores["skipped"] = sum(part["skipped"] for part in parts)
        return scores

    def final_report(self, model: nn.Module, ctx: EvalContext, final_eval: dict[str, Any]) -> dict[str, Any]:
        """The held-out line (``train.eval_blank_images``): the final validation's answers beside the
        same questions with blank images, per question type."""
        report: dict[str, Any] = {"metrics": {}, "summary": {}, "lines": []}
        real = final_eval.get("scores")
        if real is None or not self.cfg.train.eval_blank_images:
            return report
        with cp_suspended():
            blank = self.vqa_scores(model, ctx, self._eval_indices(), blank_images=True)
        report["metrics"] = {"heldout_accuracy": real["accuracy"], "heldout_per_type": real["per_type"],
                             "heldout_chance": real["chance_accuracy"], "heldout_blank_accuracy": blank["accuracy"],
                             "heldout_n": real["n"]}
        report["summary"] = {"heldout_accuracy": real["accuracy"], "heldout_blank_accuracy": blank["accuracy"],
                             "heldout_chance": real["chance_accuracy"], "heldout_n": real["n"]}
        for qtype in sorted(real["per_type"]):
            report["lines"].append(f"  {qtype:<10} accuracy {real['per_type'][qtype]:.3f} "
                                   f"(blank-image {blank['per_type'].get(qtype, 0.0):.3f}, "
                                   f"n={real['per_type_n'][qtype]})")
        report["lines"].append(f"held-out accuracy: {real['accuracy']:.3f} (chance {real['chance_accuracy']:.3f}, "
                               f"blank-image {blank['accuracy']:.3f}, n={real['n']}, "
                               f"{time.perf_counter() - ctx.started:.0f} s)")
        return report
