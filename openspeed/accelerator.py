"""The one place that answers device questions: which device, which collective backend, RNG,
memory statistics and synchronisation. No other module touches ``torch.cuda`` or ``torch_npu``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from openspeed.errors import ConfigError

DEVICE_ENV = "OPENSPEED_DEVICE"
# Device type -> collective backend, for every device ``OPENSPEED_DEVICE`` may name.
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


# Vendors' dense (no sparsity) 16-bit matmul peaks in TFLOP/s, by a substring of the device name as
# torch reports it (most specific first). MFU on these devices divides by this figure, the one every
# paper quotes; a device not listed, and the CPU, use the measured matmul peak instead.
VENDOR_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("4090", 165.0),
    ("Ascend910B1", 414.0),
    ("Ascend910B2", 376.0),
    ("Ascend910B3", 313.0),
    ("Ascend910B4", 280.0),
    ("Ascend910B", 313.0),
    ("Ascend910_93", 376.0),
)


def vendor_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The vendor's dense bf16/fp16 peak (FLOP/s) of a device named ``device_name``, or ``None`` when the
    table does not list it or ``dtype`` is not a 16-bit float (fp32 peaks depend on TF32 settings)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    compact = device_name.replace(" ", "")
    for key, tflops in VENDOR_PEAK_TFLOPS:
        if key.replace(" ", "") in compact:
            return tflops * 1e12
    return None


def process_group_backend(device_type: str) -> str:
    """The ``init_process_group`` backend for a device type: the device's own for device tensors and,
    off the CPU, gloo beside it for CPU tensors (DCP's planning and object collectives use those):
    ``gloo``, ``cpu:gloo,cuda:nccl``, ``cpu:gloo,npu:hccl``."""
    backend = BACKENDS[device_type]
    return backend if device_type == "cpu" else f"cpu:gloo,{device_type}:{backend}"


@dataclass(frozen=True)
class Accelerator:
    device_type: str  # "cpu" | "cuda" | "npu"
    backend: str  # "gloo" | "nccl" | "hccl"

    @property
    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank())

    def set_device(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.set_device(local_rank())
        elif self.device_type == "npu":
            torch.npu.set_device(local_rank())  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "npu":
            torch.npu.synchronize()  # type: ignore[attr-defined]

    def configure_math(self) -> None:
        """Process-wide math settings for this device.

        On the CPU, denormal floats are flushed to zero: as a model converges, Adam's second moments
        and tiny activations drift into the denormal range, where x86 arithmetic is many times
        slower (a demo run's steps grew 3x slower over training without it).
        """
        if self.device_type == "cpu":
            torch.set_flush_denormal(True)

    def _device_module(self):
        """``torch.cuda`` or ``torch.npu`` (``None`` on the CPU)."""
        if self.device_type == "cuda":
            return torch.cuda
        if self.device_type == "npu":
            return torch.npu  # type: ignore[attr-defined]
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if (module := self._device_module()) is not None:
            module.manual_seed_all(seed)

    def rng_state(self) -> dict:
        """The CPU generator's state and this device's (``cuda`` or ``npu``), as uint8 tensors."""
        state = {"cpu": torch.get_rng_state()}
        if (module := self._device_module()) is not None:
            state[self.device_type] = module.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if (module := self._device_module()) is not None and self.device_type in state:
            module.set_rng_state(state[self.device_type])

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device (0 on the CPU, where the host is the device)."""
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.device_type == "npu":
            return torch.npu.max_memory_allocated()  # type: ignore[attr-defined]
        return 0

    def device_name(self) -> str:
        """A name for this kind of device (the processor on the CPU), used to key cached peaks."""
        if self.device_type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device_type == "npu":
            return torch.npu.get_device_name(self.device)  # type: ignore[attr-defined]
        return platform.processor() or platform.machine() or "cpu"

    def peak_source(self, dtype: torch.dtype) -> str:
        """What :meth:`peak_flops` divides by: ``"vendor peak"`` or ``"measured matmul peak"``."""
        if self.device_type != "cpu" and vendor_peak_flops(self.device_name(), dtype) is not None:
            return "vendor peak"
        return "measured matmul peak"

    def peak_flops(self, dtype: torch.dtype) -> float:
        """This device's matmul peak in FLOP/s for ``dtype``: the vendor's dense figure for a GPU or NPU
        in :data:`VENDOR_PEAK_TFLOPS` (16-bit dtypes), else measured once and cached on disk.

        The measurement is the best of a few large square matmuls (on the CPU with the process's
        current thread count, which is part of the cache key). The cache is a JSON file under
        ``$OPENSPEED_CACHE`` (default ``~/.cache/openspeed``); a missing or unwritable cache just
        means measuring again (about a second).
        """
        if self.device_type != "cpu" and (vendor := vendor_peak_flops(self.device_name(), dtype)) is not None:
            return vendor
        threads = torch.get_num_threads() if self.device_type == "cpu" else 0
        key = f"{self.device_type}|{self.device_name()}|{dtype}|threads={threads}|torch={torch.__version__}"
        cache = Path(os.environ.get("OPENSPEED_CACHE", Path.home() / ".cache" / "openspeed")) / "peak_flops.json"
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
        peak = self._measure_matmul_peak(dtype)
        try:
            known = known if isinstance(known, dict) else {}
            known[key] = peak
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, cache)
        except OSError:
            pass
        return peak

    def _measure_matmul_peak(self, dtype: torch.dtype) -> float:
        n = 1024 if self.device_type == "cpu" else 8192
        a = torch.randn(n, n, device=self.device).to(dtype)
        b = torch.randn(n, n, device=self.device).to(dtype)
        best = float("inf")
        for rep in range(10):
            self.synchronize()
            start = time.perf_counter()
            torch.mm(a, b)
            self.synchronize()
            if rep:  # the first call warms up
                best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best

    def profiler_activities(self, with_cpu: bool = True) -> list:
        """torch.profiler activities for this device (CPU, plus the device's own when it has one)."""
        activities = [torch.profiler.ProfilerActivity.CPU] if with_cpu else []
        if self.device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        elif self.device_type == "npu":
            activities.append(torch.profiler.ProfilerActivity.PrivateUse1)
        return activities

    def autocast(self, precision: str):
        """Autocast context for ``precision`` ("fp32" gives a no-op context)."""
        if precision == "bf16":
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device_type, enabled=False)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _import_torch_npu() -> str | None:
    """Import ``torch_npu`` (which adds ``torch.npu``); ``None`` when it imports, else why it does not."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure of a broken install is reported, not raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torch_npu fails to import ({type(exc).__name__}{': ' + first if first else ''})"
    return None


@functools.cache
def get_accelerator() -> Accelerator:
    """Pick the device: ``OPENSPEED_DEVICE`` if set, else CUDA, else NPU (when torch_npu imports), else CPU.

    A value of ``OPENSPEED_DEVICE`` that is not a device type, or names a device this machine lacks,
    is a :class:`ConfigError`; a torch_npu that is installed but fails to import is a one-line warning
    (on local rank 0), and the CPU is used.
    """
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"{DEVICE_ENV}: expected one of {', '.join(BACKENDS)}, "
                              f"got {os.environ[DEVICE_ENV]!r}")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{DEVICE_ENV}=cuda, but torch {torch.__version__} finds no CUDA device "
                              f"(choose from {', '.join(BACKENDS)})")
        if forced == "npu":
            problem = _import_torch_npu()
            if problem is None and not torch.npu.is_available():  # type: ignore[attr-defined]
                problem = "torch_npu finds no NPU device"
            if problem is not None:
                raise ConfigError(f"{DEVICE_ENV}=npu, but {problem} (choose from {', '.join(BACKENDS)})")
        return Accelerator(forced, BACKENDS[forced])
    if torch.cuda.is_available():
        return Accelerator("cuda", "nccl")
    if importlib.util.find_spec("torch_npu") is not None:
        problem = _import_torch_npu()
        if problem is None and torch.npu.is_available():  # type: ignore[attr-defined]
            return Accelerator("npu", "hccl")
        if problem is not None and local_rank() == 0:
            print(f"warning: {problem}; using the CPU (set {DEVICE_ENV}=cpu to choose it)", file=sys.stderr,
                  flush=True)
    return Accelerator("cpu", "gloo")


def resolve_device(name: str | None = None) -> torch.device:
    """The device a single-process command (chat, eval, generate, convert) runs on.

    ``None`` or ``"auto"``: this machine's accelerator (:func:`get_accelerator`), the CPU when it has
    none. Otherwise a device string (``cpu``, ``cuda``, ``cuda:1``, ``npu:0``), checked to exist: a
    device this machine lacks is a :class:`ConfigError` naming it.
    """
    if name is None or str(name).strip().lower() in ("", "auto"):
        acc = get_accelerator()
        return acc.device
    kind, _, number = str(name).strip().lower().partition(":")
    if kind not in BACKENDS or (number and not number.isdigit()) or (kind == "cpu" and number):
        raise ConfigError(f"--device: expected auto, cpu, cuda[:N] or npu[:N], got {name!r}")
    if kind == "cpu":
        return torch.device("cpu")
    index = int(number) if number else local_rank()
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        problem = _import_torch_npu()
        if problem is not None:
            raise ConfigError(f"--device {name}: {problem}")
        count = torch.npu.device_count() if torch.npu.is_available() else 0  # type: ignore[attr-defined]
    if index >= count:
        found = f"{count} {kind} device{'s' if count != 1 else ''}" if count else f"no {kind} device"
        raise ConfigError(f"--device {name}: torch {torch.__version__} finds {found}")
    return torch.device(kind, index)


def init_distributed() -> tuple[int, int]:
    """Initialise the default process group (world size 1 outside a launcher). Returns (rank, world)."""
    acc = get_accelerator()
    acc.set_device()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = process_group_backend(acc.device_type)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        # One process: an in-memory store is enough, and DCP/DeviceMesh code paths stay the same.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()
