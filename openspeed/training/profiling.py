"""``profile.*``: record a torch profiler trace for a window of steps on chosen ranks."""

from __future__ import annotations

import os

import torch

from openspeed.accelerator import get_accelerator
from openspeed.config import ProfileConfig


class StepProfiler:
    """Starts before ``step_start`` and writes a Chrome trace after ``step_end``."""

    def __init__(self, cfg: ProfileConfig, rank: int, run_dir: str):
        self.cfg = cfg
        self.rank = rank
        self.enabled = cfg.enabled and rank in cfg.ranks
        self.save_dir = cfg.save_path or os.path.join(run_dir, "profile")
        self._prof = None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.cfg.step_start and self._prof is None:
            activities = get_accelerator().profiler_activities(with_cpu=self.cfg.with_cpu)
            self._prof = torch.profiler.profile(
                activities=activities or None,
                record_shapes=self.cfg.record_shapes,
                profile_memory=self.cfg.with_memory,
                with_stack=self.cfg.with_stack,
            )
            self._prof.__enter__()

    def after_step(self, step: int) -> str | None:
        if self._prof is not None and step >= self.cfg.step_end:
            self._prof.__exit__(None, None, None)
            os.makedirs(self.save_dir, exist_ok=True)
            path = os.path.join(self.save_dir, f"trace_rank{self.rank}_steps{self.cfg.step_start}-{step}.json")
            self._prof.export_chrome_trace(path)
            self._prof = None
            return path
        return None
