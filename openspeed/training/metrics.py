"""Run metrics: ``metrics.jsonl`` (global rank 0 only), TensorBoard when installed, progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


class MetricsWriter:
    """Appends one JSON record per optimizer step (and per evaluation) to ``<run_dir>/metrics.jsonl``.

    ``tensorboard`` (``logging.tensorboard``): ``None`` also writes TensorBoard events when the
    ``tensorboard`` package is installed, ``True`` asks for them (a one-line warning when they cannot
    be written; the run goes on), ``False`` never writes them.
    """

    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0, tensorboard: bool | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard is not False:
            self._tb = _summary_writer(os.path.join(run_dir, "tensorboard"), resume_step + 1,
                                       requested=tensorboard is True)

    def _truncate_after(self, step: int) -> None:
        """Keep records up to ``step``: a resumed run rewrites everything after its checkpoint."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if step > 0 and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.writelines(kept)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _summary_writer(log_dir: str, purge_step: int, requested: bool):
    """TensorBoard's ``SummaryWriter``, or ``None`` (with a warning when ``requested`` or when an
    installed tensorboard fails to import)."""
    import importlib.util

    installed = importlib.util.find_spec("tensorboard") is not None
    if not installed and not requested:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - a missing or broken install: metrics.jsonl still has it all
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"warning: logging.tensorboard: cannot use TensorBoard ({detail}); metrics go to metrics.jsonl "
              "only (pip install tensorboard, or set logging.tensorboard=false)", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(log_dir, purge_step=purge_step)


class Progress:
    """A tqdm bar on rank 0 showing loss, lr, tokens/s and the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )

    def update(self, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> None:
        if self.bar is not None:
            fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_per_s:,.0f}"}
            if mfu is not None:
                fields["mfu"] = f"{100 * mfu:.1f}%"
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
