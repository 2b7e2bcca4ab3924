"""Regional compilation: ``train.compile`` compiles each transformer block with ``torch.compile``.

One block's code is compiled once and reused by every block of its stack (the blocks are inputs of
the graph, not constants), so the first step pays for one compilation per block kind and input
shape, not per layer, and a whole-model graph never has to be traced. Only each block's ``forward``
is compiled: the hooks the parallel plans attach to the block itself (FSDP2's all-gather and
reduce-scatter, tensor parallel's input layouts, activation checkpointing's regions) run eagerly
around it, so compilation composes with them in any order.

Which modules are the blocks comes from the family's memory plan (the same layers recomputation
acts on), so a new family gets compilation by describing its layers once.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from openspeed.errors import ConfigError


def compile_enabled(cfg, device_type: str) -> bool:
    """``train.compile`` as it applies on ``device_type``: its value, or by default on off the CPU."""
    wanted = cfg.train.compile
    return device_type != "cpu" if wanted is None else bool(wanted)


def check_compile(cfg, sizes: dict[str, int], spec) -> None:
    """One-line :class:`ConfigError` for a compiled layout this version would run wrongly or not at all."""
    if spec.memory_plan is None:
        raise ConfigError(f"train.compile: {spec.name} has no memory plan naming its transformer blocks")
    if sizes.get("tp", 1) > 1:
        # torch 2.13's AOT autograd recurses without end tracing these blocks' DTensor tensor-parallel
        # linears (with or without sequence parallelism); eager TP is unaffected.
        raise ConfigError(
            f"train.compile with parallel.tp={sizes['tp']}: tensor-parallel blocks do not compile on this "
            "torch yet; set train.compile=false (FSDP, pipeline, recompute and LoRA do compile)"
        )
    if sizes.get("cp", 1) > 1:
        raise ConfigError(
            f"train.compile with parallel.cp={sizes['cp']}: context-parallel attention (its ring and all-to-all "
            "exchanges inside each block) is not compiled yet; set train.compile=false"
        )


def transformer_blocks(model: nn.Module, spec) -> list[nn.Module]:
    """The transformer blocks of ``model`` (or a pipeline stage), from the family's memory plan."""
    plan = spec.memory_plan(model)
    return [model.get_submodule(layer.name) for stack in plan.stacks for layer in stack.layers]


def compile_blocks(model: nn.Module, spec, backend: str = "inductor") -> int:
    """Compile the forward of every transformer block of ``model`` in place; returns how many.

    Parameter and module names are unchanged (checkpoints and adapters see the same model).
    """
    blocks = transformer_blocks(model, spec)
    for block in blocks:
        if getattr(block, "_openspeed_compiled", False):
            continue
        block.forward = torch.compile(block.forward, backend=backend)
        block._openspeed_compiled = True
    return len(blocks)


class CompileClock:
    """Seconds spent in torch.compile's tracing and code generation while it is installed.

    Dynamo reports the start and end of every compilation (first calls, and recompilations for new
    input shapes); the clock sums them, so the run log can say what compiling cost apart from running.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compilations = 0
        self._started: float | None = None
        self._lock = threading.Lock()
        self._installed = False

    def _start(self, *args) -> None:
        with self._lock:
            self._started = time.perf_counter()

    def _end(self, *args) -> None:
        with self._lock:
            if self._started is not None:
                self.seconds += time.perf_counter() - self._started
                self.compilations += 1
                self._started = None

    @classmethod
    def started(cls) -> CompileClock:
        """The process's one installed clock, set back to zero (a run in the same process after another
        reuses it instead of stacking callbacks)."""
        global _SHARED
        if _SHARED is None:
            _SHARED = cls()
        _SHARED.install()
        with _SHARED._lock:
            _SHARED.seconds, _SHARED.compilations, _SHARED._started = 0.0, 0, None
        return _SHARED

    def install(self) -> CompileClock:
        handler = _callback_handler()
        if handler is not None:
            # Checked against the handler's own lists: torch._dynamo.reset() clears them.
            if self._start not in handler.start_callbacks:
                handler.register_start_callback(self._start)
            if self._end not in handler.end_callbacks:
                handler.register_end_callback(self._end)
            self._installed = True
        return self

    def remove(self) -> None:
        handler = _callback_handler()
        if handler is not None and self._installed:
            if self._start in handler.start_callbacks:
                handler.remove_start_callback(self._start)
            if self._end in handler.end_callbacks:
                handler.remove_end_callback(self._end)
            self._installed = False


_SHARED: CompileClock | None = None


def _callback_handler():
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # an older torch without compile callbacks: no timing, compilation still works
        return None
    return callback_handler
