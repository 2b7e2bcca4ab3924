"""Offload to host memory: saved activations ("swap attention") and optimizer state ("swap optimizer").

Activation offload: the tensors autograd saves inside chosen modules (e.g. the attention of every
decoder layer) are copied to host memory during forward and copied back when backward needs them.
Where the device has streams, the device-to-host copies run on a side stream (overlapping the next
ops' compute) into pinned memory; on the CPU the host *is* the device, so nothing is copied and the
tensors are only accounted as host bytes (see :mod:`openspeed.memory.saved_bytes`).

Optimizer offload: :class:`OffloadedAdamW` keeps AdamW's moments (and optionally fp32 master weights)
in host memory and runs the update there, copying the updated parameters back to the device. Its
updates equal ``torch.optim.AdamW``'s.

Device questions go through ``openspeed.accelerator`` and torch's device-generic ``torch.accelerator``
/ ``torch.Stream`` API; nothing here names a particular accelerator.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from openspeed.accelerator import get_accelerator
from openspeed.errors import ConfigError
from openspeed.memory import _regions
from openspeed.memory.plan import MemoryPlan
from openspeed.memory.saved_bytes import _is_parameter, record_saved

HOST = torch.device("cpu")


def _device_is_host() -> bool:
    return get_accelerator().device_type == "cpu"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor is its own local tensor)."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def _in_backward() -> bool:
    # A module called while the autograd engine runs is being recomputed by a checkpoint; its saved
    # tensors belong to the checkpoint's own hooks then.
    return torch._C._current_graph_task_id() != -1


# ------------------------------------------------------------------------------------------------
# Activation offload
# ------------------------------------------------------------------------------------------------


class _HostBlock:
    """One storage's bytes parked in host memory, and (during backward) its copy back on the device."""

    __slots__ = ("device", "host", "event", "on_device")

    def __init__(self, device: torch.device, host: torch.Tensor, event) -> None:
        self.device = device
        self.host = host
        self.event = event
        self.on_device: torch.Tensor | None = None

    def fetch(self) -> torch.Tensor:
        """The bytes back on the device (copied once; shared by every view saved from the storage)."""
        if self.on_device is None:
            if self.event is not None:
                torch.accelerator.current_stream(self.device).wait_event(self.event)
            self.on_device = self.host.to(self.device, non_blocking=self.host.is_pinned())
            # Host memory is not needed any more (pinned memory outlives a pending copy by itself).
            self.host = None
        return self.on_device


class _Offloaded:
    """A saved tensor whose storage waits in host memory: the block and the view's geometry."""

    __slots__ = ("block", "dtype", "offset", "shape", "stride")

    def __init__(self, block: _HostBlock, tensor: torch.Tensor) -> None:
        self.block = block
        self.dtype = tensor.dtype
        self.offset = tensor.storage_offset()
        self.shape = tuple(tensor.shape)
        self.stride = tensor.stride()


class _OffloadedDTensor:
    """A saved DTensor: its offloaded local tensor and what makes it a DTensor again."""

    __slots__ = ("local", "mesh", "placements", "shape", "stride")

    def __init__(self, local, tensor: torch.Tensor) -> None:
        self.local = local
        self.mesh = tensor.device_mesh
        self.placements = tensor.placements
        self.shape = tensor.shape
        self.stride = tensor.stride()


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class HostOffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that park every saved activation in host memory until backward.

    The whole storage under a saved tensor is copied and the tensor comes back as the same view of it
    (same offset and strides: some kernels' backward insists on the exact layout they saved); a
    storage saved several times in one forward of the module is copied once while it is unchanged.
    DTensors travel as their local tensors. Parameters (and views of them) stay where they are.

    Args:
        pin_memory: copy into pinned host memory (asynchronous copies); default: when the device is
            not the CPU.
        stream: a side stream for the device-to-host copies (``None``: the current stream).
        always_copy: copy tensors that are already in host memory too (on the CPU this runs the
            device path, for tests); otherwise they are kept as they are and counted as host bytes.
    """

    def __init__(
        self, pin_memory: bool | None = None, stream: torch.Stream | None = None, always_copy: bool = False
    ) -> None:
        self.pin_memory = (not _device_is_host()) if pin_memory is None else pin_memory
        self.stream = stream
        self.always_copy = always_copy
        self._blocks: dict[int, tuple[_HostBlock, torch.UntypedStorage, int]] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if _is_parameter(tensor):
            return tensor.detach()
        local = _local(tensor)
        if local is not tensor:
            return _OffloadedDTensor(self._pack_local(local.detach()), tensor)
        return self._pack_local(tensor)

    def _pack_local(self, tensor: torch.Tensor):
        if tensor.device.type == "cpu" and not self.always_copy:
            # Already in host memory (always, on the CPU): keep it, count it as host bytes.
            record_saved(tensor, host=True)
            return tensor.detach()
        storage = tensor.untyped_storage()
        cached = self._blocks.get(storage.data_ptr())
        # Reuse a copy only while the storage is unchanged since (same version counter). The cache
        # holds the storage, so its address cannot be handed to a new one while we are inside the
        # module; it is dropped when the module's forward ends.
        if cached is not None and cached[2] == tensor._version:
            block = cached[0]
        else:
            block = self._copy_to_host(storage, tensor.device)
            self._blocks[storage.data_ptr()] = (block, storage, tensor._version)
            record_saved(block.host, host=True)
        return _Offloaded(block, tensor)

    def _copy_to_host(self, storage: torch.UntypedStorage, device: torch.device) -> _HostBlock:
        source = _bytes_of(storage, device)
        host = torch.empty(source.shape, dtype=torch.uint8, device=HOST, pin_memory=self.pin_memory)
        if self.stream is None or device.type == "cpu":
            host.copy_(source, non_blocking=self.pin_memory)
            return _HostBlock(device, host, None)
        # The copy must see the tensor's final value: the side stream waits for the work queued so far.
        self.stream.wait_stream(torch.accelerator.current_stream(device))
        with self.stream:
            host.copy_(source, non_blocking=self.pin_memory)
            event = self.stream.record_event()
        # Keep the allocator from reusing the device memory before the side-stream copy is done.
        source.record_stream(self.stream)
        return _HostBlock(device, host, event)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._blocks.clear()

    @classmethod
    def _unpack(cls, packed):
        if isinstance(packed, _OffloadedDTensor):
            from torch.distributed.tensor import DTensor

            local = cls._unpack(packed.local)
            return DTensor.from_local(
                local,
                packed.mesh,
                packed.placements,
                run_check=False,
                shape=packed.shape,
                stride=packed.stride,
            )
        if not isinstance(packed, _Offloaded):
            return packed
        data = packed.block.fetch()
        view = torch.empty(0, dtype=packed.dtype, device=data.device)
        return view.set_(data.untyped_storage(), packed.offset, packed.shape, packed.stride)


def offload_module(
    module: nn.Module,
    pin_memory: bool | None = None,
    stream: torch.Stream | None = None,
    always_copy: bool = False,
) -> None:
    """Park the activations saved during ``module``'s forward in host memory until backward.

    Raises ``ConfigError`` if ``module`` is already offloaded (:func:`apply_activation_offload` also
    refuses modules inside recomputed regions, whose activations are not kept at all).
    """
    if module in _regions.offloaded:
        raise ConfigError(
            f"{type(module).__name__} is already offloaded (apply_activation_offload called twice?)"
        )
    active: list[HostOffloadHooks | None] = []

    def enter(mod: nn.Module, args: tuple) -> None:
        if _in_backward():
            active.append(None)
            return
        hooks = HostOffloadHooks(pin_memory, stream, always_copy)
        hooks.__enter__()
        active.append(hooks)

    def leave(mod: nn.Module, args: tuple, output) -> None:
        if active:
            hooks = active.pop()
            if hooks is not None:
                hooks.__exit__(None, None, None)

    # Prepended: entered before a checkpoint on the same module saves its inputs; left after it.
    module.register_forward_pre_hook(enter, prepend=True)
    module.register_forward_hook(leave, always_call=True)
    _regions.offloaded.add(module)


def apply_activation_offload(
    model: nn.Module,
    patterns: list[str] | tuple[str, ...],
    *,
    plan: MemoryPlan,
    pin_memory: bool | None = None,
    overlap: bool = True,
    always_copy: bool = False,
) -> list[str]:
    """Offload the saved activations of the modules ``patterns`` name (see :meth:`MemoryPlan.select`).

    ``overlap``: run the device-to-host copies on one side stream shared by the offloaded modules
    (when the device has streams). ``always_copy``: see :class:`HostOffloadHooks`. Returns the module
    paths offloaded.
    """
    names = plan.select(list(patterns))
    recomputed = [m for m in model.modules() if m in _regions.recomputed]
    stream = None
    if overlap and not _device_is_host() and torch.accelerator.is_available():
        stream = torch.Stream(device=get_accelerator().device)
    for name in names:
        module = model.get_submodule(name)
        if any(module in _regions.strict_descendants(region) for region in recomputed):
            raise ConfigError(
                f"memory.offload_activations: {name} lies inside a recomputed region, whose activations "
                "are recomputed rather than kept; offload whole layers or recompute fewer"
            )
        offload_module(module, pin_memory, stream, always_copy)
    return names


# ------------------------------------------------------------------------------------------------
# Optimizer offload
# ------------------------------------------------------------------------------------------------


@dataclass
class StateBytes:
    """Optimizer memory: state kept on the compute device and in host memory."""

    device: int = 0
    host: int = 0


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> StateBytes:
    """Bytes of ``optimizer``'s state resident with the parameters (``device``) and in host memory.

    A plain optimizer's state tensors count as device bytes when they sit on their parameter's
    device (on the CPU, the host is that device); :class:`OffloadedAdamW` keeps everything it
    allocates in host memory by construction.
    """
    if isinstance(optimizer, OffloadedAdamW):
        return StateBytes(device=0, host=optimizer.host_bytes())
    on_device, on_host = [], []
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                same = _local(value).device == _local(param).device
                (on_device if same else on_host).append(value)
    return StateBytes(device=_bytes(on_device), host=_bytes(on_host))


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW with its state in host memory ("swap optimizer"); the update runs on the host.

    Each step copies the gradients to host memory, runs ``torch.optim.AdamW`` there on host copies of
    the parameters and copies the updated values back, so the updates equal the plain optimizer's
    (bit for bit when the device is the CPU). ``param_groups`` hold the model's own parameters, so
    learning-rate schedulers and ``torch.distributed.checkpoint`` state dicts work as with AdamW;
    ``state[param]`` exposes the host tensors (as DTensors for DTensor parameters).

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        master_weights: keep an fp32 master copy of every parameter on the host and update that
            (the device copy may be lower precision). Without it a host copy in the parameter's
            dtype is refreshed from the device before each update; a plain fp32 CPU parameter is
            updated in place.
        pin_memory: pinned host buffers (asynchronous copies); default: when the device is not the CPU.

    Load model weights before the optimizer state (as ``set_state_dict`` does): loading the state
    refreshes the master weights from the parameters.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_weights: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.master_weights = master_weights
        self.pin_memory = (not _device_is_host()) if pin_memory is None else pin_memory
        self._host: dict[nn.Parameter, torch.Tensor] = {}
        self._grad_buffers: dict[nn.Parameter, torch.Tensor] = {}
        inner_groups = []
        for group in self.param_groups:
            hosts = [self._host_copy(p) for p in group["params"]]
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": hosts})
        self._inner = torch.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._init_state()

    # ------------------------------------------------------------------ host copies

    def _in_place(self, param: nn.Parameter) -> bool:
        return not self.master_weights and _local(param) is param and param.device.type == "cpu"

    def _host_copy(self, param: nn.Parameter) -> torch.Tensor:
        if self._in_place(param):
            host = param
        else:
            local = _local(param).detach()
            dtype = torch.float32 if self.master_weights else local.dtype
            host = torch.empty(local.shape, dtype=dtype, device=HOST, pin_memory=self.pin_memory)
            host.copy_(local)
        self._host[param] = host
        return host

    def _init_state(self) -> None:
        """Create the (zero) AdamW state in host memory now, and expose it under the model's params."""
        for param, host in self._host.items():
            state = self._inner.state[host]
            if not state:
                # What AdamW's first step would create (a CPU float32 step count and zero moments).
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(host, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(host, memory_format=torch.preserve_format)
            self.state[param] = self._exposed(param, state)

    @staticmethod
    def _exposed(param: nn.Parameter, state: dict) -> dict:
        if _local(param) is param:
            return state  # the very dict the host AdamW updates
        from torch.distributed.tensor import DTensor

        return {
            key: DTensor.from_local(
                value,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
            if key != "step"
            else value
            for key, value in state.items()
        }

    def host_bytes(self) -> int:
        """Host memory this optimizer holds: moments, host parameter copies and gradient buffers."""
        tensors = [v for s in self._inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        tensors += [h for p, h in self._host.items() if h is not p]
        tensors += list(self._grad_buffers.values())
        return _bytes(tensors)

    def sync_master_from_params(self) -> None:
        """Refresh the host parameter copies from the (e.g. freshly loaded) device parameters."""
        with torch.no_grad():
            for param, host in self._host.items():
                if host is not param:
                    host.copy_(_local(param))

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        copied = False
        for param, host in self._host.items():
            if host is param:
                continue  # updated in place; its .grad is already the parameter's
            grad = param.grad
            if grad is None:
                host.grad = None
                continue
            local_grad = _local(grad)
            buf = self._grad_buffers.get(param)
            if buf is None:
                buf = torch.empty(host.shape, dtype=host.dtype, device=HOST, pin_memory=self.pin_memory)
                self._grad_buffers[param] = buf
            buf.copy_(local_grad, non_blocking=self.pin_memory)
            if not self.master_weights:
                host.copy_(_local(param), non_blocking=self.pin_memory)
            host.grad = buf
            copied = copied or local_grad.device.type != "cpu"
        if copied and self.pin_memory:
            get_accelerator().synchronize()  # the host must see the copies before it updates
        for group, inner in zip(self.param_groups, self._inner.param_groups):
            for key, value in group.items():
                if key != "params":
                    inner[key] = value
        self._inner.step()
        for param, host in self._host.items():
            if host is not param and param.grad is not None:
                _local(param).copy_(host, non_blocking=self.pin_memory)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param, host in self._host.items():
            if host is not param:
                host.grad = None

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as AdamW does, then move the values into the host state (and refresh masters)."""
        super().load_state_dict(state_dict)
        loaded = self.state
        self.state = defaultdict(dict)
        self.sync_master_from_params()
        with torch.no_grad():
            for param, host in self._host.items():
                values = loaded.get(param, {})
                state = self._inner.state[host]
                for key, value in values.items():
                    if key in state and isinstance(value, torch.Tensor):
                        state[key].copy_(_local(value))
        self._init_state()
