"""Loss curves of a run from its ``metrics.jsonl``, drawn off-screen with matplotlib's Agg canvas."""

from __future__ import annotations

import json
import math
import os

from openspeed.errors import DataError

# Weight of the past in the exponential moving average (TensorBoard's default smoothing).
SMOOTHING = 0.9
# Above this max/min ratio the loss axis is logarithmic, so the tail of a curve that fell by orders
# of magnitude stays readable.
LOG_SCALE_RATIO = 20.0


def read_loss_records(metrics_jsonl_path: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, val_loss) pairs, sorted by step; unreadable lines are skipped."""
    if not os.path.isfile(metrics_jsonl_path):
        raise DataError(f"metrics file not found: {metrics_jsonl_path}")
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    with open(metrics_jsonl_path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut off by a crash, or a record without a step
            for key, target in (("loss", train), ("val_loss", val)):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    target[step] = float(value)  # a resumed run rewrites a step: the last one wins
    return sorted(train.items()), sorted(val.items())


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (early points are not pulled towards zero)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def plot_losses(metrics_jsonl_path: str, out_png: str) -> str:
    """Plot training loss per step (light), its smoothed curve and the validation losses; returns ``out_png``.

    Raises :class:`DataError` when the file is missing or holds no loss at all.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no GUI backend,
    # safe to call from a training process or a thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = read_loss_records(metrics_jsonl_path)
    if not train and not val:
        raise DataError(f"no loss or val_loss records in {metrics_jsonl_path}")

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, ema(list(losses)), color="tab:blue", linewidth=2, label=f"train loss (EMA {SMOOTHING})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, color="tab:orange", marker="o", linewidth=1.5, label="val loss")
    values = [v for _, v in train + val]
    if min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    run_name = os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl_path)))
    ax.set_title(f"Loss: {run_name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png
