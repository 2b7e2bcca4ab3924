"""Count the bytes autograd keeps for backward: the measure every memory saver here is judged by.

On the CPU the host is the device, so process memory says nothing about what recomputation or offload
saves. What they change is the set of tensors held between forward and backward, and that is what
:class:`SavedBytesMeter` counts, through ``torch.autograd.graph.saved_tensors_hooks``:

* every tensor autograd saves while the meter is active, each untyped storage counted once (a view
  of a counted storage adds nothing);
* the inputs a checkpointed region keeps (non-reentrant checkpoint saves them through the same
  hooks), while the tensors saved *inside* the region are dropped by the checkpoint's own hooks and
  so are not counted;
* the op outputs a selective-checkpoint policy caches (reported by :mod:`openspeed.memory.recompute`
  through :func:`record_saved`);
* tensors moved to host memory by activation offload (reported by :mod:`openspeed.memory.offload`)
  count as *host* bytes, not device bytes.

Parameters (and views of them, like the transposed weight a linear layer saves) are not counted:
they live for the whole run whatever the savers do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from openspeed.accelerator import get_accelerator

# Meters currently counting (innermost last); savers that keep tensors outside autograd's own
# bookkeeping report them to every active meter.
_ACTIVE: list[SavedBytesMeter] = []


@dataclass
class ModuleBytes:
    """Bytes attributed to one module: saved on the device, on the host, and its forward inputs.

    ``inputs`` is the size of the tensors the module's first forward was called with (each storage
    once; a storage shared with another module's inputs counts for both): about what remains saved
    when the module alone is recomputed as a whole, erring on the large side.
    """

    device: int = 0
    host: int = 0
    inputs: int = 0


@dataclass
class SavedBytesReport:
    """What a meter counted; ``per_module`` holds the modules it was asked to attribute to, and
    ``unattributed`` what was saved outside them (``device``/``host`` are the totals)."""

    device: int = 0
    host: int = 0
    per_module: dict[str, ModuleBytes] = field(default_factory=dict)
    unattributed: ModuleBytes = field(default_factory=ModuleBytes)

    @property
    def total(self) -> int:
        return self.device + self.host


def record_saved(tensor: torch.Tensor, host: bool = False) -> None:
    """Report a tensor kept for backward outside autograd's saved-tensor hooks to the active meters."""
    for meter in _ACTIVE:
        meter.record(tensor, host=host)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (what actually occupies memory on this rank)."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def _is_parameter(tensor: torch.Tensor) -> bool:
    base = tensor._base if tensor._is_view() else None
    return isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter)


class SavedBytesMeter:
    """Context manager counting the bytes saved for backward during the forwards run inside it.

    Args:
        modules: optional ``{name: module}`` to attribute bytes to. A tensor is attributed to the
            innermost of these modules running when it is first saved; the rest goes to
            ``report.unattributed``. Hooks are added on entry and removed on exit.
        exclude: a module whose parameters and buffers are never counted (parameters and their
            views are skipped anyway; this also skips buffers and tensors sharing their storage).
        device: the compute device; default: where ``exclude``'s parameters live, else the
            accelerator's device.

    After the block, read :attr:`report` (``device``, ``host`` and ``per_module`` bytes). On a CPU
    compute device the host is the device, and only tensors an offloader moved out count as host
    bytes; otherwise tensors in host memory count as host bytes.

    Example::

        with SavedBytesMeter({"layer0": model.layers[0]}) as meter:
            loss = model(batch).loss
        print(meter.report.device, meter.report.per_module["layer0"].device)
        loss.backward()
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module] | None = None,
        exclude: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.modules = dict(modules or {})
        self.report = SavedBytesReport(per_module={name: ModuleBytes() for name in self.modules})
        if device is None and exclude is not None:
            first = next(iter(exclude.parameters()), None)
            device = _plain(first).device if first is not None and not first.is_meta else None
        device = torch.device(device) if device is not None else get_accelerator().device
        self._device_is_host = device.type == "cpu"
        self._excluded: set[int] = set()
        if exclude is not None:
            for tensor in [*exclude.parameters(), *exclude.buffers()]:
                self._excluded.add(_plain(tensor).untyped_storage().data_ptr())
        # Storages counted so far, held until exit so an address cannot be reused while counting.
        self._seen: dict[tuple[int, bool], torch.UntypedStorage] = {}
        self._inputs_done: set[str] = set()
        self._stack: list[str] = []
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # ------------------------------------------------------------------ counting

    def _bucket(self) -> ModuleBytes:
        return self.report.per_module[self._stack[-1]] if self._stack else self.report.unattributed

    def record(self, tensor: torch.Tensor, host: bool = False) -> None:
        """Count ``tensor``'s storage once (as host bytes when ``host``)."""
        if not isinstance(tensor, torch.Tensor) or _is_parameter(tensor):
            return
        tensor = _plain(tensor)
        if tensor.is_meta or _is_parameter(tensor):
            return
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded or storage.nbytes() == 0:
            return
        host = host or (tensor.device.type == "cpu" and not self._device_is_host)
        key = (ptr, host)
        if key in self._seen:
            return
        self._seen[key] = storage
        nbytes = storage.nbytes()
        bucket = self._bucket()
        if host:
            self.report.host += nbytes
            bucket.host += nbytes
        else:
            self.report.device += nbytes
            bucket.device += nbytes

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.record(tensor)
        # A detached alias, not the tensor itself: saving an output tensor with its grad_fn would
        # make a reference cycle (grad_fn -> saved tensor -> grad_fn) that only the GC frees.
        return tensor.detach()

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # ------------------------------------------------------------------ attribution

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._stack.append(name)
            if name in self._inputs_done:
                return  # called again (a recompute in backward): inputs are counted once per module
            self._inputs_done.add(name)
            storages = {}
            for value in [*args, *kwargs.values()]:
                if isinstance(value, torch.Tensor) and not value.is_meta:
                    storage = _plain(value).untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            self.report.per_module[name].inputs += sum(storages.values())

        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return hook

    def __enter__(self) -> SavedBytesMeter:
        for name, module in self.modules.items():
            # Prepended: our pre-hook runs before a checkpoint's, which saves the region's inputs.
            self._handles.append(
                module.register_forward_pre_hook(self._pre_hook(name), prepend=True, with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
        _ACTIVE.append(self)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        _ACTIVE.remove(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        self._inputs_done.clear()
        self._stack.clear()


def measure_saved_bytes(
    model: nn.Module, run, modules: Mapping[str, nn.Module] | None = None
) -> tuple[SavedBytesReport, object]:
    """Run ``run()`` (a forward) under a :class:`SavedBytesMeter`; returns ``(report, run's result)``."""
    with SavedBytesMeter(modules, exclude=model) as meter:
        result = run()
    return meter.report, result
