"""Memory savers applied to a model from outside: recomputation, activation / optimizer offload,
adaptive recompute, and the saved-bytes meter that measures them (FEATURES M1-M5).

A model family describes its layers with a :class:`MemoryPlan` kept beside the model
(``openspeed/models/<family>/memory_plan.py``); nothing here looks at class names.
"""

from openspeed.memory.adaptive import (
    AdaptivePlan,
    adaptive_recompute,
    apply_adaptive,
    max_over_ranks,
    measure_layers,
    plan_adaptive,
)
from openspeed.memory.offload import (
    HostOffloadHooks,
    OffloadedAdamW,
    StateBytes,
    apply_activation_offload,
    optimizer_state_bytes,
)
from openspeed.memory.plan import LayerParts, LayerStack, MemoryPlan
from openspeed.memory.recompute import RECOMPUTE_MODES, apply_recompute, save_compute_intensive
from openspeed.memory.saved_bytes import (
    ModuleBytes,
    SavedBytesMeter,
    SavedBytesReport,
    measure_saved_bytes,
    record_saved,
)

__all__ = [
    "RECOMPUTE_MODES",
    "AdaptivePlan",
    "HostOffloadHooks",
    "LayerParts",
    "LayerStack",
    "MemoryPlan",
    "ModuleBytes",
    "OffloadedAdamW",
    "SavedBytesMeter",
    "SavedBytesReport",
    "StateBytes",
    "adaptive_recompute",
    "apply_activation_offload",
    "apply_adaptive",
    "apply_recompute",
    "max_over_ranks",
    "measure_layers",
    "measure_saved_bytes",
    "optimizer_state_bytes",
    "plan_adaptive",
    "record_saved",
    "save_compute_intensive",
]
